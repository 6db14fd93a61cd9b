"""Dice of each segmenter from an annotator's box prompt, per phantom difficulty.

For every lesion of N phantom cases (2D kinds, or the displayed slice of a volume), the prompt is the
lesion's box widened by 1-3 px (as the predicted-mode expert draws it); each segmenter runs on it and
its mask is scored against the lesion's true mask on that slice. Prints a Markdown table.

    python scripts/segmenter_dice.py [--n 40] [--segmenters medsam threshold]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from medgym.environments.expert import annotator_box
from medgym.environments.phantom import DIFFICULTY_LEVELS
from medgym.environments.sources import PhantomSource
from medgym.environments.templates import lesions
from medgym.tools import TOOLS, ToolContext, run_tool


def dices(n: int, segmenter: str, difficulty: str, first_seed: int = 5000) -> list[float]:
    source = PhantomSource(difficulty=difficulty)
    out = []
    for seed in range(first_seed, first_seed + n):
        case = source.case(seed)
        study = case.study
        rng = np.random.default_rng([seed, 7919])
        ctx = ToolContext(study=study, segmenter=segmenter)
        for truth in lesions(study):
            plane_truth = truth if truth.ndim == 2 else truth[study.display_slice]
            if not plane_truth.any():
                continue
            box, _ = annotator_box(study, plane_truth, rng)
            args = {"box": box} if truth.ndim == 2 else {"box": box, "slice_index": study.display_slice}
            got = run_tool(TOOLS, "segment", args, ctx)
            if got.error:
                out.append(0.0)
                continue
            mask = ctx.masks[got.data["mask_id"]]
            mask = mask if mask.ndim == 2 else mask[study.display_slice]
            out.append(float(2 * (mask & plane_truth).sum() / (mask.sum() + plane_truth.sum())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--segmenters", nargs="+", default=["medsam", "threshold"])
    args = ap.parse_args()
    print("| difficulty | " + " | ".join(f"{s} Dice (mean / median)" for s in args.segmenters) + " | lesions |")
    print("| --- | " + " | ".join("---" for _ in args.segmenters) + " | --- |")
    for level in DIFFICULTY_LEVELS:
        cells, count = [], 0
        for seg in args.segmenters:
            d = dices(args.n, seg, level)
            count = len(d)
            cells.append(f"{statistics.mean(d):.3f} / {statistics.median(d):.3f}")
        print(f"| {level} | " + " | ".join(cells) + f" | {count} |", flush=True)


if __name__ == "__main__":
    main()
