"""Commands for evaluators: replay, score, report, export-sft.

Handlers import their modules lazily so ``medgym --help`` stays fast, and because
replay and export need ``tools``/``environments``, which sit above ``traces``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_DIFFERS = 1  # replay: some step differs or verification failed
EXIT_BAD_INPUT = 2  # a file is missing or nothing could be read


def _existing(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"no such trace file: {text} (pass the traces.jsonl written by --out/record_to)"
        )
    return path


def _nonneg_float(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def cmd_replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from medgym.evaluation.replay import replay_file

    with tqdm(desc="replay", unit="episode", disable=args.json, file=sys.stderr) as bar:
        report = replay_file(
            args.traces,
            verify=args.verify,
            cases_dir=args.cases,
            segmenter=args.segmenter,
            rtol=args.rtol,
            atol=args.atol,
            limit=args.limit,
            progress=bar,
        )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        for line in report.lines():
            print(line)
        notes = sorted({n for e in report.episodes for n in e.notes})
        for note in notes:
            print(f"note: {note}")
        print(("OK: " if report.ok else "FAIL: ") + report.summary())
    return 0 if report.ok else EXIT_DIFFERS


def cmd_score(args: argparse.Namespace) -> int:
    from medgym.traces.score import format_table, mode_mismatch, plot_stages, score_file, short_names

    scores = [score_file(p) for p in args.traces]
    names = short_names(args.traces)
    mismatch = mode_mismatch(scores, names)
    if mismatch:
        print(f"warning: {mismatch}", file=sys.stderr)
    for name, s in zip(names, scores, strict=True):
        for problem in s["problems"]:
            print(f"warning: {name}: {problem}", file=sys.stderr)
    if args.png:
        plot_stages(scores, names, args.png)
    if args.json:
        print(json.dumps(scores[0] if len(scores) == 1 else {n: s for n, s in zip(names, scores, strict=True)}))
    else:
        print(format_table(scores, names))
        if args.png:
            print(f"chart: {args.png}")
    return 0 if any(s["episodes"] for s in scores) else EXIT_BAD_INPUT


def cmd_report(args: argparse.Namespace) -> int:
    from medgym.traces.report import write_report
    from medgym.traces.store import read_traces

    problems = read_traces(args.traces).problems
    for problem in problems:
        print(f"warning: {args.traces}: {problem}", file=sys.stderr)
    out = write_report(args.traces, args.out, title=args.title)
    print(f"report: {out}")
    return 0


def cmd_export_sft(args: argparse.Namespace) -> int:
    from medgym.environments.contract import system_prompt
    from medgym.traces.export import ExportFilter, export_sft

    keep = ExportFilter(correct_only=args.correct_only, stages=args.stage or (), sources=args.source or ())
    try:
        stats = export_sft(args.traces, args.out, keep, tool_images=args.tool_images, system_prompt=system_prompt)
    except ValueError as exc:
        print(f"medgym export-sft: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for line in stats.problems + stats.skipped:
        print(f"warning: {line}", file=sys.stderr)
    print(json.dumps({"episodes": stats.episodes, "kept": stats.kept, "skipped": len(stats.skipped), "out": args.out}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this subpackage's subcommands to the `medgym` parser."""
    r = sub.add_parser(
        "replay",
        help="re-run every recorded tool call and report steps whose result differs; non-zero exit on any",
    )
    r.add_argument("traces", type=_existing, help="a traces.jsonl file (images/ beside it)")
    r.add_argument(
        "--verify", action="store_true", help="also check each episode's content hash, the image files and torn lines"
    )
    r.add_argument("--cases", default=None, help="folder of saved cases (medgym generate) for traces without a seed")
    r.add_argument(
        "--segmenter",
        default=None,
        choices=["medsam", "sam", "threshold"],
        help="segment backend to replay with (default: the one the trace recorded)",
    )
    r.add_argument("--rtol", type=_nonneg_float, default=1e-6, help="relative tolerance for numbers in tool data")
    r.add_argument("--atol", type=_nonneg_float, default=1e-9, help="absolute tolerance for numbers in tool data")
    r.add_argument("--limit", type=int, default=None, help="replay only the first N episodes")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=cmd_replay)

    s = sub.add_parser(
        "score", help="accuracy by stage, IoU, tool use, answer-evidence consistency; files side by side"
    )
    s.add_argument("traces", nargs="+", type=_existing, help="one or more traces.jsonl files")
    s.add_argument("--json", action="store_true", help="print JSON (one object, or one per file by name)")
    s.add_argument("--png", default=None, help="write a bar chart of accuracy per stage to this PNG")
    s.set_defaults(func=cmd_score)

    p = sub.add_parser("report", help="one self-contained HTML page of a trace file (images inlined, filters)")
    p.add_argument("traces", type=_existing)
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--title", default=None)
    p.set_defaults(func=cmd_report)

    e = sub.add_parser("export-sft", help="episodes as a datasets Dataset for TRL SFT (messages + images)")
    e.add_argument("traces", nargs="+", type=_existing)
    e.add_argument("--out", required=True, help="folder for Dataset.save_to_disk")
    e.add_argument("--correct-only", action="store_true", help="keep only episodes answered correctly")
    e.add_argument("--stage", nargs="+", default=None, help="keep only these stages")
    e.add_argument("--source", nargs="+", default=None, help="keep only these task sources (e.g. phantom)")
    e.add_argument(
        "--tool-images",
        default="tool",
        choices=["tool", "user"],
        help="where tool images go: in the tool turn (default) or a user turn after it (TRL 1.16 SFT collator)",
    )
    e.set_defaults(func=cmd_export_sft)
