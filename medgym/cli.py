"""The ``medgym`` command: check, generate, eval, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from medgym import add_tool_mode_option


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text}")
    return value


def cmd_check(args: argparse.Namespace) -> int:
    if args.model or args.fix:
        if not args.model:
            raise SystemExit("medgym check: --fix OUT needs --model DIR (the folder to repair)")
        from medgym.models.commands import cmd_check_model

        return cmd_check_model(args)
    from medgym.environments.checks import run_checks

    results = run_checks(segmenter=args.segmenter)
    for r in results:
        print(f"{'ok  ' if r.ok else 'FAIL'} {r.name}: {r.detail}")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from medgym.environments.sources import make_source

    source = make_source(
        args.source, tool_mode=args.tool_mode, **({"size": args.size} if args.source == "phantom" else {})
    )
    out = Path(args.out)
    index = []
    for seed in tqdm(range(args.seed, args.seed + args.n), desc="generate", unit="case"):
        case = source.case(seed)
        path = case.save(out)
        index.append(
            {
                "case_id": case.case_id,
                "stage": case.stage,
                "template": case.template,
                "tool_mode": args.tool_mode,
                "file": path.name,
            }
        )
    (out / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    print(json.dumps({"n": len(index), "out": str(out)}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from medgym.agents.backends import BackendUnavailable, make_policy
    from medgym.environments.evaluate import evaluate

    try:
        policy = make_policy(args.policy, tool_mode=args.tool_mode, constrained=args.constrained, source=args.source)
    except BackendUnavailable as exc:
        raise SystemExit(f"medgym eval: {exc}") from None
    summary = evaluate(
        policy,
        source=args.source,
        n=args.n,
        seed=args.seed,
        out=args.out,
        progress=not args.json,
        segmenter=args.segmenter,
        tool_mode=args.tool_mode,
        temperature=args.temperature,
        blind=args.blind,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"{summary['policy']} on {summary['n']} {summary['source']} cases ({summary['tool_mode']} tools"
            f"{', blind' if summary['blind'] else ''}): "
            f"accuracy {summary['accuracy']:.3f}"
        )
        for stage, acc in summary["by_stage"].items():
            print(f"  {stage:<18} {acc:.3f}  (n={summary['n_by_stage'][stage]})")
        print(
            f"  mean IoU {summary['mean_iou']}, tool calls {summary['tool_calls']}, "
            f"format errors {summary['format_errors']}"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from medgym.bench import run_benchmarks

    print(json.dumps(run_benchmarks(size=args.size, passages=args.passages, steps=args.steps), indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medgym", description="Agents that think with medical images.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "check",
        help="check_env on the env and check_tool on every tool, or with --model DIR a model folder's "
        "tool-image contract; non-zero exit on failure",
    )
    c.add_argument("--segmenter", default="threshold", choices=["threshold", "medsam"], help="segment backend to check")
    from medgym.models.commands import add_check_options

    add_check_options(c)
    c.set_defaults(func=cmd_check)

    g = sub.add_parser("generate", help="write cases (arrays + question + expert trace) to a folder")
    g.add_argument("--source", default="phantom")
    g.add_argument("--n", type=_positive, default=10)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", type=_positive, default=256, help="phantom image size in pixels")
    g.add_argument("--out", required=True)
    add_tool_mode_option(g, "predicted leaves out questions only an oracle answers (recorded in index.jsonl)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="run a policy on cases and report accuracy by stage")
    e.add_argument(
        "--policy",
        default="expert",
        help="expert | embedded | embedded-sft | embedded:PATH | transformers:PATH | openai:MODEL@URL | demo",
    )
    add_tool_mode_option(e)
    e.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    e.add_argument(
        "--constrained",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="decode the policy under the turn grammar so every turn parses (local models; openai: sends the "
        "grammar as vLLM's structured_outputs); off by default, so format errors are measured",
    )
    e.add_argument(
        "--blind",
        action="store_true",
        help="the policy reads every picture black while its tools still see the study: blind minus normal "
        "accuracy is what looking adds",
    )
    e.add_argument("--source", default="phantom")
    e.add_argument("--n", type=_positive, default=50)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", default=None, help="folder for traces.jsonl and images/")
    e.add_argument("--segmenter", default="medsam", choices=["medsam", "threshold", "sam"])
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="env throughput, trace overhead, segment latency, retrieval p50")
    b.add_argument("--size", type=_positive, default=512)
    b.add_argument("--passages", type=_positive, default=100_000)
    b.add_argument("--steps", type=_positive, default=200)
    b.set_defaults(func=cmd_bench)

    # Each subpackage adds its own commands; its handlers import lazily so the CLI starts fast.
    from medgym.agents import commands as agent_commands
    from medgym.evaluation import commands as trace_commands
    from medgym.models import commands as model_commands
    from medgym.rl import commands as rl_commands

    for module in (agent_commands, rl_commands, trace_commands, model_commands):
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
