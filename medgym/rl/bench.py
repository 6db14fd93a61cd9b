"""Held-out comparison of policies: accuracy by stage, mean IoU and tool use (``medgym train bench``)."""

from __future__ import annotations

import time
from typing import Any

from medgym.environments.case import STAGES


def run_bench(
    checkpoints: dict[str, str],
    n: int = 30,
    seed: int = 0,
    source: str = "phantom",
    progress: bool = True,
    tool_mode: str = "predicted",
) -> dict[str, Any]:
    """The expert and each named checkpoint on cases ``seed .. seed + n - 1`` (threshold segmenter)."""
    from medgym.agents.backends import EmbeddedBackend
    from medgym.environments.evaluate import evaluate
    from medgym.environments.policies import ExpertPolicy
    from medgym.rl.runs import resolve_checkpoint

    policies: dict[str, Any] = {"expert": ExpertPolicy(tool_mode=tool_mode)}
    for name, path in checkpoints.items():
        policies[name] = EmbeddedBackend(resolve_checkpoint(path))
    out = {}
    for name, policy in policies.items():
        t0 = time.perf_counter()
        ev = evaluate(
            policy, source=source, n=n, seed=seed, progress=progress, segmenter="threshold", tool_mode=tool_mode
        )
        keep = ("accuracy", "by_stage", "n_by_stage", "mean_iou", "tool_calls", "tool_calls_by_name", "tool_errors")
        out[name] = {k: ev[k] for k in (*keep, "format_errors", "mean_steps", "mean_reward")}
        out[name]["seconds_per_case"] = round((time.perf_counter() - t0) / n, 3)
    return {"n": n, "seed": seed, "source": source, "tool_mode": tool_mode, "results": out}


def bench_table(bench: dict[str, Any]) -> str:
    """The bench as a Markdown table: accuracy overall and per stage (cases in brackets), IoU, tool use.

    >>> row = {"accuracy": 0.5, "by_stage": {"measurement": 0.25}, "n_by_stage": {"measurement": 4},
    ...        "mean_iou": 0.1, "tool_calls": 3, "format_errors": 2}
    >>> print(bench_table({"n": 4, "results": {"sft": row}}).splitlines()[2])
    | sft | 0.500 | - | 0.250 (4) | - | - | 0.100 | 3 | 2 |
    """
    head = ["policy", "accuracy", *STAGES, "mean IoU", "tool calls", "format errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in bench["results"].items():
        by_stage, counts = r.get("by_stage", {}), r.get("n_by_stage", {})
        stages = [f"{by_stage[s]:.3f} ({counts.get(s, '?')})" if s in by_stage else "-" for s in STAGES]
        iou = r.get("mean_iou")
        cells = [
            name,
            f"{r['accuracy']:.3f}",
            *stages,
            f"{iou:.3f}" if iou is not None else "-",
            str(r.get("tool_calls", "-")),
            str(r.get("format_errors", "-")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
