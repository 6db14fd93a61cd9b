"""Copy a trained checkpoint into the package as a shipped policy (``embedded`` or ``embedded-sft``).

Weights are stored as float16 safetensors (loaded as float32), halving the wheel's share; the
checkpoint's ``medgym.json`` keeps its recipe, system text and tool schemas, and gets the model id,
how to reproduce it, and (``--bench``) the held-out figures measured for it by ``medgym train bench``.

An intermediate checkpoint (``checkpoint-N``, chosen on a validation curve) ships with the run's record:
``--run-meta RUN/final`` adds that run's recipe, training time and held-out curve to its ``medgym.json``.
Only the model's own files travel (weights, config, processor and tokenizer files, ``medgym.json``), never
trainer state; the destination is emptied first.

Usage: python scripts/ship_checkpoint.py runs/sft_embedded_mixed_brief/final embedded-sft \
           --model-id embedded-sft --reproduce "bash scripts/embedded_recipe.sh sft" \
           [--bench runs/bench/bench.json --bench-name embedded-sft] [--run-meta RUN/final]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medgym import CHECKPOINTS_DIR

NAMES = ("embedded", "embedded-sft")
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "chat_template.jinja",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
RUN_KEYS = ("recipe", "train_seconds", "collapse", "heldout_curve")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="a checkpoint folder written by medgym train (its final/)")
    p.add_argument("name", choices=NAMES)
    p.add_argument("--model-id", required=True)
    p.add_argument("--reproduce", action="append", default=[], help="a command of the recipe (repeatable, in order)")
    p.add_argument("--bench", help="bench.json of medgym train bench --out")
    p.add_argument("--bench-name", help="the policy's name in that bench")
    p.add_argument("--note", default=None, help="a sentence on what the checkpoint is")
    p.add_argument(
        "--run-meta", help="the run's final/ folder, whose recipe and curve an intermediate checkpoint ships with"
    )
    p.add_argument("--into", default=str(CHECKPOINTS_DIR), help="the folder of shipped policies (the package's)")
    args = p.parse_args(argv)

    src, dst = Path(args.source), Path(args.into) / args.name
    missing = [f for f in ("model.safetensors", "medgym.json", "config.json") if not (src / f).is_file()]
    if missing:
        raise SystemExit(f"{src} is not a medgym checkpoint: no {', '.join(missing)}")
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    weights = {k: v.to(torch.float16) for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    meta = json.loads((src / "medgym.json").read_text())
    if args.run_meta:
        run = json.loads((Path(args.run_meta) / "medgym.json").read_text())
        meta.update({k: run[k] for k in RUN_KEYS if k in run})
    meta.update(model_id=args.model_id, dtype_on_disk="float16 (loaded as float32)")
    if args.reproduce:
        meta["reproduce"] = args.reproduce
    if args.note:
        meta["note"] = args.note
    if args.bench:
        bench = json.loads(Path(args.bench).read_text())
        name = args.bench_name or args.name
        keys = ("n", "seed", "source", "tool_mode", "constrained")
        meta["held_out_bench"] = {
            **{k: bench[k] for k in keys},
            **bench["results"][name],
            "differences": {k: v for k, v in bench.get("differences", {}).items() if name in k},
        }
    (dst / "medgym.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({"shipped": str(dst), "bytes": sum(f.stat().st_size for f in dst.iterdir())}))


if __name__ == "__main__":
    main()
