"""Commands of training: ``medgym train sft|grpo|bench``, ``medgym quickstart``.

``medgym train sft --config configs/sft_embedded.yaml --num_train_epochs 2`` -- the stage's parser
is a ``trl.TrlParser`` over its config class (:mod:`medgym.rl.config`): every field is a
``--field`` option with its help text, the YAML file sets values and the options override them.
``--resume`` continues from the newest ``checkpoint-N`` in ``output_dir``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trl import TrlParser

from medgym import add_tool_mode_option


class ConfigParser(TrlParser):
    """A stage's ``TrlParser`` that also keeps the raw strings it was given.

    The top-level ``medgym`` parser hands a stage its strings before any YAML is read;
    :func:`cmd_train` parses them again with :meth:`~trl.TrlParser.parse_args_and_config`,
    which puts the ``--config`` file under the options.
    """

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        namespace.stage_argv = list(args or [])
        return namespace, rest


def stage_parser(parser: TrlParser) -> TrlParser:
    """The options a training stage has besides its config fields."""
    parser.add_argument("--config", default=None, help="YAML file of config fields (options override it)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-N in output_dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def parse_config(cls: type, argv: list[str]):
    """(config, options) from a stage's strings: ``--config`` YAML first, ``--key value`` options over it."""
    from medgym.rl.config import RENAMED

    try:
        config, options = stage_parser(ConfigParser([cls])).parse_args_and_config(argv)
    except ValueError as exc:
        hints = [f"`{old}` is now `{new}`" for old, new in RENAMED.items() if f"--{old}'" in str(exc)]
        raise ValueError(" ".join([str(exc), *hints])) from None
    if options.quiet:
        config.disable_tqdm = True
    return config, options


def cmd_train(args: argparse.Namespace) -> int:
    from medgym.rl.config import GRPOConfig, SFTConfig
    from medgym.rl.runs import run_grpo, run_sft

    cls, run = (SFTConfig, run_sft) if args.stage == "sft" else (GRPOConfig, run_grpo)
    try:
        config, options = parse_config(cls, args.stage_argv)
        summary = run(config, resume=options.resume)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"medgym train {args.stage}: {exc}") from None
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from medgym.rl.bench import bench_table, run_bench

    named = {}
    for item in args.checkpoint or ["embedded=embedded"]:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"medgym train bench: --checkpoint takes NAME=PATH, got {item!r}")
        named[name] = path
    pairs = [tuple(p.split("-vs-", 1)) for p in args.compare or []]
    if any(len(p) != 2 or not set(p) <= set(named) for p in pairs):
        raise SystemExit("medgym train bench: --compare takes A-vs-B with A and B named by --checkpoint")
    bench = run_bench(
        named,
        n=args.n,
        seed=args.seed,
        progress=not args.quiet,
        tool_mode=args.tool_mode,
        constrained=args.constrained,
        compare=pairs or None,
        previous=json.loads(Path(args.reuse).read_text()) if args.reuse else None,
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(bench, indent=1))
        (out / "bench.md").write_text(bench_table(bench) + "\n")
    print(json.dumps({k: v for k, v in bench.items() if k != "cases"}, indent=1))  # per-case rows: bench.json
    print(bench_table(bench))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from medgym.rl.quickstart import run_quickstart

    summary = run_quickstart(
        args.out,
        n_eval=args.n_eval,
        grpo_steps=args.grpo_steps,
        progress=not args.quiet,
        checkpoint=args.checkpoint,
        tool_mode=args.tool_mode,
    )
    keys = ("html", "png", "tool_mode", "before", "after", "note", "seconds")
    print(json.dumps({k: summary[k] for k in keys}, indent=1, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this subpackage's subcommands to the `medgym` parser."""
    from medgym.rl.config import GRPOConfig, SFTConfig

    t = sub.add_parser("train", help="train the embedded policy: sft (expert traces) or grpo (TRL, real tools)")
    stages = t.add_subparsers(dest="stage", required=True, parser_class=ConfigParser)
    s = stages.add_parser("sft", dataclass_types=[SFTConfig], help="SFT cold start on expert tool-use conversations")
    stage_parser(s).set_defaults(func=cmd_train)
    g = stages.add_parser(
        "grpo",
        dataclass_types=[GRPOConfig],
        help="GRPO with TRL's GRPOTrainer(environment_factory=...) on medgym tools",
    )
    stage_parser(g).set_defaults(func=cmd_train)

    b = stages.add_parser("bench", help="held-out accuracy by stage and IoU: expert vs checkpoints")
    b.add_argument(
        "--checkpoint",
        action="append",
        metavar="NAME=PATH",
        help="a checkpoint to compare (repeatable); PATH as blind:PATH runs it with every picture black "
        "(its tools still see the study), so beside PATH run normally it shows what looking adds",
    )
    b.add_argument("--n", type=int, default=30, help="held-out cases")
    b.add_argument("--seed", type=int, default=0, help="first held-out case seed")
    b.add_argument("--out", help="folder for bench.json and bench.md (the Markdown table)")
    b.add_argument(
        "--compare",
        action="append",
        metavar="A-vs-B",
        help="paired bootstrap 95%% interval of A - B (repeatable; default: each checkpoint against the first)",
    )
    b.add_argument("--constrained", action="store_true", help="decode the checkpoints' turns under the turn grammar")
    b.add_argument(
        "--reuse", metavar="BENCH_JSON", help="take policies already run there (same cases, settings, checkpoint)"
    )
    add_tool_mode_option(b, "tools of every policy (the shipped policies were trained on predicted-mode tools)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    q = sub.add_parser("quickstart", help="index, cases, eval, a short GRPO run, eval again, HTML summary")
    q.add_argument("--out", required=True, help="folder for everything the quickstart writes")
    q.add_argument("--n-eval", type=int, default=12, help="held-out phantom cases per evaluation")
    q.add_argument("--grpo-steps", type=int, default=4, help="GRPO steps of the continuation")
    q.add_argument("--checkpoint", default="embedded", help="starting checkpoint (default: the shipped one)")
    add_tool_mode_option(q, "predicted by default: the shipped policy is trained with predicted-mode tools")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quickstart)
