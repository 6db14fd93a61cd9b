"""Held-out comparison of policies: accuracy by stage, mean IoU and tool use (``medgym train bench``)."""

from __future__ import annotations

from typing import Any


def run_bench(
    checkpoints: dict[str, str], n: int = 30, seed: int = 0, source: str = "phantom", progress: bool = True
) -> dict[str, Any]:
    """The expert and each named checkpoint on cases ``seed .. seed + n - 1`` (threshold segmenter)."""
    from medgym.environments.evaluate import evaluate
    from medgym.environments.policies import ExpertPolicy
    from medgym.rl.policy_model import EmbeddedPolicy
    from medgym.rl.runs import resolve_checkpoint

    policies: dict[str, Any] = {"expert": ExpertPolicy()}
    for name, path in checkpoints.items():
        policies[name] = EmbeddedPolicy(resolve_checkpoint(path))
    out = {}
    for name, policy in policies.items():
        ev = evaluate(policy, source=source, n=n, seed=seed, progress=progress, segmenter="threshold")
        out[name] = {
            k: ev[k] for k in ("accuracy", "by_stage", "mean_iou", "tool_calls", "format_errors", "mean_reward")
        }
    return {"n": n, "seed": seed, "source": source, "results": out}
