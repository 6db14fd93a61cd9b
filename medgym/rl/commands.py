"""Commands of training: ``medgym train sft|grpo``, ``medgym quickstart``.

``medgym train sft --config configs/sft_embedded.yaml --epochs 2`` -- every config field is
also a ``--field`` option (help text from the config dataclass), values read as YAML.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from pathlib import Path


def _add_config_options(p: argparse.ArgumentParser, cls: type) -> None:
    p.add_argument("--config", default=None, help="YAML file of config fields (options below override it)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint-N in output_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    group = p.add_argument_group("config fields (YAML values: --train_seeds '[1000, 64]')")
    for f in fields(cls):
        default = f.default if f.default is not MISSING else "(see config)"
        names = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])
        group.add_argument(
            *names,
            dest=f"cfg__{f.name}",
            default=argparse.SUPPRESS,
            metavar="VALUE",
            help=f"{f.metadata.get('help', '')} (default: {default})",
        )


def _overrides(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for key, value in vars(args).items():
        if key.startswith("cfg__"):
            out += [f"--{key[5:]}", value]
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from medgym.rl.config import GRPOConfigMedgym, SFTConfig, load_config

    try:
        if args.stage == "sft":
            from medgym.rl.runs import run_sft

            cfg = load_config(SFTConfig, args.config, _overrides(args))
            summary = run_sft(cfg, resume=args.resume, progress=not args.quiet)
        else:
            from medgym.rl.runs import run_grpo

            cfg = load_config(GRPOConfigMedgym, args.config, _overrides(args))
            summary = run_grpo(cfg, resume=args.resume, progress=not args.quiet)
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
    bench = run_bench(named, n=args.n, seed=args.seed, progress=not args.quiet)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(bench, indent=1))
        (out / "bench.md").write_text(bench_table(bench) + "\n")
    print(json.dumps(bench, indent=1))
    print(bench_table(bench))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from medgym.rl.quickstart import run_quickstart

    summary = run_quickstart(
        args.out, n_eval=args.n_eval, grpo_steps=args.grpo_steps, progress=not args.quiet, checkpoint=args.checkpoint
    )
    print(json.dumps({k: summary[k] for k in ("html", "png", "before", "after", "seconds")}, indent=1, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this subpackage's subcommands to the `medgym` parser."""
    from medgym.rl.config import GRPOConfigMedgym, SFTConfig

    t = sub.add_parser("train", help="train the embedded policy: sft (expert traces) or grpo (TRL, real tools)")
    stages = t.add_subparsers(dest="stage", required=True)
    s = stages.add_parser("sft", help="SFT cold start on expert tool-use conversations")
    _add_config_options(s, SFTConfig)
    s.set_defaults(func=cmd_train)
    g = stages.add_parser("grpo", help="GRPO with TRL's GRPOTrainer(environment_factory=...) on medgym tools")
    _add_config_options(g, GRPOConfigMedgym)
    g.set_defaults(func=cmd_train)

    b = stages.add_parser("bench", help="held-out accuracy by stage and IoU: expert vs checkpoints")
    b.add_argument("--checkpoint", action="append", metavar="NAME=PATH", help="a checkpoint to compare (repeatable)")
    b.add_argument("--n", type=int, default=30, help="held-out cases")
    b.add_argument("--seed", type=int, default=0, help="first held-out case seed")
    b.add_argument("--out", help="folder for bench.json and bench.md (the Markdown table)")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    q = sub.add_parser("quickstart", help="index, cases, eval, a short GRPO run, eval again, HTML summary")
    q.add_argument("--out", required=True, help="folder for everything the quickstart writes")
    q.add_argument("--n-eval", type=int, default=12, help="held-out phantom cases per evaluation")
    q.add_argument("--grpo-steps", type=int, default=4, help="GRPO steps of the continuation")
    q.add_argument("--checkpoint", default="embedded", help="starting checkpoint (default: the shipped one)")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quickstart)
