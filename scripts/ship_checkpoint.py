"""Copy a trained checkpoint into the package as a shipped policy (``embedded`` or ``embedded-sft``).

Weights are stored as float16 safetensors (loaded as float32), halving the wheel's share; the
checkpoint's ``medgym.json`` keeps its recipe, system text and tool schemas, and gets the model id,
how to reproduce it, and (``--bench``) the held-out figures measured for it by ``medgym train bench``.

Usage: python scripts/ship_checkpoint.py runs/sft_embedded_predicted/final embedded-sft \
           --model-id embedded-sft --reproduce "medgym train sft --config configs/sft_embedded_predicted.yaml" \
           [--bench runs/bench/bench.json --bench-name embedded-sft]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="a checkpoint folder written by medgym train (its final/)")
    p.add_argument("name", choices=NAMES)
    p.add_argument("--model-id", required=True)
    p.add_argument("--reproduce", action="append", default=[], help="a command of the recipe (repeatable, in order)")
    p.add_argument("--bench", help="bench.json of medgym train bench --out")
    p.add_argument("--bench-name", help="the policy's name in that bench")
    p.add_argument("--note", default=None, help="a sentence on what the checkpoint is")
    args = p.parse_args()

    src, dst = Path(args.source), CHECKPOINTS_DIR / args.name
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, dst / f.name)
    weights = {k: v.to(torch.float16) for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    meta = json.loads((src / "medgym.json").read_text())
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
