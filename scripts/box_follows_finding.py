"""Does a policy look? How its first segment prompt box follows the finding, over recorded episodes.

For every episode whose case has a finding box (``answer_box``) and whose policy wrote a segment box,
compares the centre of that first prompt box with the centre of the finding: Pearson r per axis,
the spread of each (a policy that draws the same box whatever the picture has a small spread and
r near 0), and how many distinct first boxes it wrote. Where the policy called ``detect``: the share
of episodes that did, and of first segment boxes copied from a listed candidate (and from the first).

Usage: python scripts/box_follows_finding.py runs/why_embedded-sft/traces.jsonl [more traces.jsonl ...]
(traces from ``medgym eval --policy P --out DIR``). Prints one JSON object per file.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from medgym.environments.env import segment_prompt_box


def prompt_box(call: dict) -> list | None:
    """A recorded segment call's prompt box (see :func:`medgym.environments.env.segment_prompt_box`)."""
    return segment_prompt_box(call["arguments"], call.get("text") or "")


def first_prompt_boxes(path: str) -> tuple[np.ndarray, np.ndarray]:
    drawn, truth = [], []
    with open(path) as fh:
        for line in fh:
            episode = json.loads(line)
            finding = episode["header"].get("answer_box")
            if not finding:
                continue
            calls = [c for step in episode["steps"] for c in step.get("calls") or []]
            boxes = [prompt_box(c) for c in calls if c["name"] == "segment"]
            boxes = [b for b in boxes if b is not None]
            if boxes and len(boxes[0]) == 4:
                drawn.append(boxes[0])
                truth.append(finding)
    return np.asarray(drawn, dtype=float).reshape(-1, 4), np.asarray(truth, dtype=float).reshape(-1, 4)


def detect_use(path: str) -> dict:
    """Share of episodes calling detect, and of first segment boxes that copy a candidate it listed."""
    episodes = detected = segmented = copied = copied_first = 0
    with open(path) as fh:
        for line in fh:
            calls = [c for step in json.loads(line)["steps"] for c in step.get("calls") or []]
            episodes += 1
            listed = [b for c in calls if c["name"] == "detect" for b in (c.get("data") or {}).get("boxes", [])]
            detected += any(c["name"] == "detect" for c in calls)
            boxes = [b for b in (prompt_box(c) for c in calls if c["name"] == "segment") if b is not None]
            if listed and boxes:
                segmented += 1
                first = [float(v) for v in boxes[0]]
                copied += any(first == [float(v) for v in b] for b in listed)
                copied_first += first == [float(v) for v in listed[0]]
    share = lambda n, d: round(n / d, 3) if d else None  # noqa: E731
    return {
        "detect_share": share(detected, episodes),
        "first_box_copied_share": share(copied, segmented),
        "first_box_is_first_candidate_share": share(copied_first, segmented),
    }


def summary(path: str) -> dict:
    drawn, truth = first_prompt_boxes(path)
    out: dict = {"traces": path, "episodes": len(drawn), "distinct_first_boxes": len({tuple(b) for b in drawn})}
    out.update(detect_use(path))
    for axis, cols in (("x", [0, 2]), ("y", [1, 3])):
        a, b = drawn[:, cols].mean(1), truth[:, cols].mean(1)
        out[f"{axis}_centre_r"] = round(float(np.corrcoef(a, b)[0, 1]), 2) if len(a) > 2 and a.std() > 0 else None
        out[f"{axis}_centre_std_policy_px"] = round(float(a.std()), 1) if len(a) else None
        out[f"{axis}_centre_std_finding_px"] = round(float(b.std()), 1) if len(b) else None
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for p in sys.argv[1:]:
        print(json.dumps(summary(p)))
