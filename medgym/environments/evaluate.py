"""Run a policy over cases in the env and aggregate accuracy by stage, IoU and tool use."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from medgym.environments import ENV_ID
from medgym.environments.case import STAGES, Case
from medgym.environments.parsing import parse_action


class Policy(Protocol):
    model_id: str

    def reset(self, case: Case, observation: dict[str, Any]) -> None: ...

    def act(self, observation: dict[str, Any]) -> str: ...


def evaluate(
    policy: Policy,
    source: str = "phantom",
    n: int = 100,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = False,
    **env_kwargs: Any,
) -> dict[str, Any]:
    """Episodes for case seeds ``seed .. seed + n - 1``; returns the summary dict the CLI prints."""
    record_to = Path(out) / "traces.jsonl" if out is not None else None
    env = gym.make(ENV_ID, source=source, record_to=record_to, model_id=policy.model_id, **env_kwargs)
    correct: dict[str, list[float]] = defaultdict(list)
    ious: list[float] = []
    rewards: list[float] = []
    steps: list[int] = []
    calls: Counter[str] = Counter()
    tool_errors = format_errors = truncated_n = 0
    for case_seed in tqdm(range(seed, seed + n), disable=not progress, desc="eval", unit="case"):
        obs, info = env.reset(seed=case_seed, options={"case_seed": case_seed})
        case: Case = env.unwrapped.case  # type: ignore[attr-defined]
        policy.reset(case, obs)
        terminated = truncated = False
        k = 0
        while not (terminated or truncated):
            action = policy.act(obs)
            obs, reward, terminated, truncated, info = env.step(action)
            k += 1
            for call in _calls_in(action):
                calls[call] += 1
            tool_errors += info.get("tool_errors", 0)
            format_errors += "format_error" in info
        steps.append(k)
        truncated_n += int(truncated and not terminated)
        correct[case.stage].append(1.0 if info.get("correct") else 0.0)
        rewards.append(float(reward) if terminated else 0.0)
        if "box_iou" in info:
            ious.append(info["box_iou"])
    env.close()
    all_correct = [c for v in correct.values() for c in v]
    return {
        "n": n,
        "source": source,
        "policy": policy.model_id,
        "accuracy": float(np.mean(all_correct)) if all_correct else 0.0,
        "by_stage": {s: float(np.mean(correct[s])) for s in STAGES if correct[s]},
        "n_by_stage": {s: len(correct[s]) for s in STAGES if correct[s]},
        "mean_iou": float(np.mean(ious)) if ious else None,
        "tool_calls": sum(calls.values()),
        "tool_calls_by_name": dict(sorted(calls.items())),
        "tool_errors": tool_errors,
        "format_errors": format_errors,
        "truncated": truncated_n,
        "mean_steps": float(np.mean(steps)) if steps else 0.0,
        "mean_reward": float(np.mean(rewards)) if rewards else 0.0,
        "traces": str(record_to) if record_to else None,
    }


def _calls_in(action: str) -> list[str]:
    return [c["name"] for c in parse_action(action).calls]
