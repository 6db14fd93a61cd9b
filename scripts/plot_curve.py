"""One learning-curve PNG for GRPO stages run one after another (each its own output_dir).

Rows of each stage's ``metrics.jsonl`` are placed after the previous stage's last step, then drawn
with the GRPO panels (reward, held-out accuracy and grounding IoU, format errors, tool-call and
tool-failure frequency, KL). Usage:
python scripts/plot_curve.py runs/grpo_embedded runs/grpo_embedded_stage2 --out docs/grpo_curve.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from medgym.rl.metrics import GRPO_PANELS, MetricsLog


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="GRPO output folders, in training order")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        merged = MetricsLog(tmp)
        offset = 0
        for run in args.runs:
            rows = MetricsLog(run).rows()
            if not rows:
                raise SystemExit(f"no metrics in {run}")
            for i, row in enumerate(rows):
                if offset and row.get("step") == 0 and any(k.startswith("heldout/") for k in row) and i == 0:
                    continue  # the next stage's start point is the previous stage's end point
                merged.append({**row, "step": row.get("step", 0) + offset})
            offset += max(r.get("step", 0) for r in rows)
        png = merged.plot(GRPO_PANELS, "curve.png")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, args.out)
    print(json.dumps({"png": args.out, "steps": offset}))


if __name__ == "__main__":
    main()
