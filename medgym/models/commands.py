"""Commands of the model zoo: ``medgym model init``, and ``medgym check --model DIR [--fix OUT]``.

``medgym model init --arch qwen2_vl --out m/qwen2_vl`` builds a random-initialised model of a real
architecture offline (:mod:`medgym.models.zoo`); ``medgym check --model m/qwen2_vl`` checks the
tool-image contract of any model folder and ``--fix OUT`` writes a repaired copy
(:mod:`medgym.models.contract_check`).
"""

from __future__ import annotations

import argparse
import json

MARK = {True: "ok  ", False: "FAIL", None: "skip"}


def cmd_model_init(args: argparse.Namespace) -> int:
    from medgym.models.zoo import init_model

    try:
        meta = init_model(args.arch, args.out, size=args.size, seed=args.seed)
    except ValueError as exc:
        raise SystemExit(f"medgym model init: {exc}") from None
    print(json.dumps({**meta, "out": args.out}))
    return 0


def print_report(report) -> None:
    for f in report.findings:
        print(f"{MARK[f.ok]} {f.name}: {f.detail}")
        if f.ok is False and f.fix:
            print(f"     fix: {f.fix}")
    failed = [f for f in report.findings if f.ok is False]
    print(f"{report.path}: {'passed' if report.ok else f'{len(failed)} failed'}")


def cmd_check_model(args: argparse.Namespace) -> int:
    """``medgym check --model DIR [--fix OUT]``: 0 when DIR (or, with --fix, the repaired OUT) passes."""
    from medgym.models.contract_check import check_model, write_repaired

    try:
        report = check_model(args.model)
    except FileNotFoundError as exc:
        raise SystemExit(f"medgym check: {exc}") from None
    print_report(report)
    if not args.fix:
        if not report.ok and report.repair is not None:
            print(f"repairable: {report.repair.description}; run `medgym check --model {args.model} --fix OUT`")
        return 0 if report.ok else 1
    if not report.ok and not report.repairable:
        print(f"cannot repair {args.model}: see the fixes above; nothing written")
        return 1
    try:
        write_repaired(args.model, args.fix, None if report.ok else report.repair)
    except ValueError as exc:
        raise SystemExit(f"medgym check: {exc}") from None
    print(f"wrote {args.fix} ({'unchanged: nothing to repair' if report.ok else report.repair.description})")
    fixed = check_model(args.fix)
    print_report(fixed)
    return 0 if fixed.ok else 1


def add_check_options(c: argparse.ArgumentParser) -> None:
    """The model-folder options of ``medgym check``."""
    c.add_argument("--model", default=None, help="check the tool-image contract of this model folder instead")
    c.add_argument(
        "--fix", default=None, metavar="OUT", help="with --model: write a repaired copy of the folder to OUT"
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add this subpackage's subcommands to the `medgym` parser."""
    from medgym.models.zoo import ARCHS, TOKENIZER_SIZES

    m = sub.add_parser("model", help="model zoo: build random-initialised models of real VLM architectures")
    actions = m.add_subparsers(dest="model_command", required=True)
    i = actions.add_parser("init", help="build a random-initialised model of an architecture, offline")
    i.add_argument("--arch", required=True, choices=list(ARCHS), help="the architecture")
    i.add_argument("--out", required=True, help="folder to save it in (loads with AutoModelForImageTextToText)")
    i.add_argument("--size", default="tiny", choices=list(TOKENIZER_SIZES), help="tiny: seconds to build and run")
    i.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    i.set_defaults(func=cmd_model_init)
