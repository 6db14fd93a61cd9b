"""Run any policy over cases in the env and aggregate accuracy by stage, grounding and tool use.

The policy is driven through the one protocol (:mod:`medgym.environments.policies`): it reads
the contract's messages — the same ones the agent graph and the TRL bridge build — and writes a
turn; the env parses and scores it. So ``medgym eval`` scores the expert, the embedded policy, a
local transformers model or an OpenAI-compatible endpoint with one loop and one summary.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from medgym import ENV_ID
from medgym.environments.case import STAGES, Case
from medgym.environments.contract import DEFAULT_TOOL_MODE, Message, question_messages, tool_messages
from medgym.environments.policies import Policy, bind_case

SUMMARY_KEYS = (
    "n",
    "source",
    "policy",
    "tool_mode",
    "blind",
    "accuracy",
    "answer_form",
    "by_stage",
    "n_by_stage",
    "mean_iou",
    "mean_prompt_iou",
    "mean_mask_iou",
    "mean_mask_dice",
    "tool_calls",
    "tool_calls_by_name",
    "tool_errors",
    "format_errors",
    "format_error_rate",
    "truncated",
    "mean_steps",
    "mean_reward",
    "seconds_per_turn",
    "traces",
)


def blinded(messages: list[Message]) -> list[Message]:
    """``messages`` with every picture replaced by a black one of the same shape: what a policy reads when it
    cannot look, while its tools still work on the study (their text results are kept).

    >>> m = blinded([{"role": "user", "content": "q", "images": [np.full((2, 3, 3), 200, np.uint8)]}])
    >>> m[0]["images"][0].shape, int(m[0]["images"][0].max()), m[0]["content"]
    ((2, 3, 3), 0, 'q')
    """
    return [{**m, "images": [np.zeros_like(np.asarray(im)) for im in m.get("images") or []]} for m in messages]


def run_episode(
    env: gym.Env,
    policy: Policy,
    case_seed: int,
    temperature: float = 0.0,
    case: Case | None = None,
    blind: bool = False,
) -> dict[str, Any]:
    """One episode of ``policy`` on the case of ``case_seed`` (or on ``case`` itself): turns, calls, final info,
    and the contract messages it read and wrote (``messages``; the last is its final turn). ``blind``: the
    policy reads every picture black (:func:`blinded`); the tools and the scoring still see the study."""
    options: dict[str, Any] = {"case": case} if case is not None else {"case_seed": case_seed}
    obs, info = env.reset(seed=case_seed, options=options)
    base = env.unwrapped
    case = base.case  # type: ignore[attr-defined]
    bound = bind_case(policy, case)
    # The unsanitised question and full-resolution pictures, as the agent graph and the TRL bridge show them.
    messages: list[Message] = question_messages(base.question_text(), base.question_images(), base.tool_mode)  # type: ignore[attr-defined]
    terminated = truncated = False
    turns, calls, tool_errors, format_errors, seconds = 0, Counter(), 0, 0, 0.0
    reward = 0.0
    all_records: list = []
    while not (terminated or truncated):
        t0 = time.perf_counter()
        action = bound.next_turn(blinded(messages) if blind else messages, temperature=temperature)
        seconds += time.perf_counter() - t0
        obs, reward, terminated, truncated, info = env.step(action)
        turns += 1
        messages.append({"role": "assistant", "content": action, "images": []})
        if "format_error" in info:
            format_errors += 1
            messages.append({"role": "user", "content": info["format_error"], "images": [], "kind": "format_error"})
        records = info.get("calls") or []
        all_records += records
        calls.update(r.name for r in records)
        tool_errors += info.get("tool_errors", 0)
        messages += tool_messages(records, base.max_images)  # type: ignore[attr-defined]
    return {
        "case": case,
        "info": info,
        "reward": float(reward) if terminated else 0.0,
        "terminated": terminated,
        "truncated": truncated and not terminated,
        "turns": turns,
        "calls": calls,
        "records": all_records,
        "tool_errors": tool_errors,
        "format_errors": format_errors,
        "seconds": seconds,
        "messages": messages,
    }


def evaluate(
    policy: Policy,
    source: str = "phantom",
    n: int = 100,
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = False,
    tool_mode: str = DEFAULT_TOOL_MODE,
    temperature: float = 0.0,
    per_case: list[dict[str, Any]] | None = None,
    blind: bool = False,
    **env_kwargs: Any,
) -> dict[str, Any]:
    """Episodes for case seeds ``seed .. seed + n - 1``; returns the summary dict the CLI prints (:data:`SUMMARY_KEYS`).

    ``per_case``, a list, receives one row per episode (seed, stage, correct, box IoU, format errors,
    tool calls): what paired comparisons (bootstrap intervals) between policies need. ``blind``: the policy
    reads every picture black while its tools still see the study, so blind minus normal accuracy is what
    looking adds (recorded as the summary's ``blind``).
    """
    record_to = Path(out) / "traces.jsonl" if out is not None else None
    env = gym.make(
        ENV_ID, source=source, record_to=record_to, model_id=policy.model_id, tool_mode=tool_mode, **env_kwargs
    )
    correct: dict[str, list[float]] = defaultdict(list)
    in_form: list[bool] = []  # answered in the form the question asks (a letter, yes/no, a number, a box)
    ious: dict[str, list[float]] = defaultdict(list)
    rewards: list[float] = []
    steps: list[int] = []
    calls: Counter[str] = Counter()
    tool_errors = format_errors = truncated_n = 0
    seconds = 0.0
    try:
        for case_seed in tqdm(range(seed, seed + n), disable=not progress, desc="eval", unit="case"):
            ep = run_episode(env, policy, case_seed, temperature, blind=blind)
            info = ep["info"]
            steps.append(ep["turns"])
            calls.update(ep["calls"])
            tool_errors += ep["tool_errors"]
            format_errors += ep["format_errors"]
            seconds += ep["seconds"]
            truncated_n += int(ep["truncated"])
            correct[ep["case"].stage].append(1.0 if info.get("correct") else 0.0)
            in_form.append((info.get("reward_parts") or {}).get("format") == 1.0)
            rewards.append(ep["reward"])
            if per_case is not None:
                per_case.append(
                    {
                        "seed": case_seed,
                        "stage": ep["case"].stage,
                        "correct": bool(info.get("correct")),
                        "answer_form": in_form[-1],
                        "box_iou": float(info["box_iou"]) if "box_iou" in info else None,
                        "format_errors": ep["format_errors"],
                        "tool_calls": sum(ep["calls"].values()),
                    }
                )
            for key in ("box_iou", "prompt_iou", "mask_iou", "mask_dice"):
                if key in info:
                    ious[key].append(float(info[key]))
    finally:
        env.close()
    all_correct = [c for v in correct.values() for c in v]
    n_turns = sum(steps)

    def mean(xs: list[float]) -> float | None:
        return float(np.mean(xs)) if xs else None

    summary = {
        "n": n,
        "source": source,
        "policy": policy.model_id,
        "tool_mode": tool_mode,
        "blind": blind,
        "accuracy": float(np.mean(all_correct)) if all_correct else 0.0,
        "answer_form": float(np.mean(in_form)) if in_form else 0.0,
        "by_stage": {s: float(np.mean(correct[s])) for s in STAGES if correct[s]},
        "n_by_stage": {s: len(correct[s]) for s in STAGES if correct[s]},
        "mean_iou": mean(ious["box_iou"]),
        "mean_prompt_iou": mean(ious["prompt_iou"]),
        "mean_mask_iou": mean(ious["mask_iou"]),
        "mean_mask_dice": mean(ious["mask_dice"]),
        "tool_calls": sum(calls.values()),
        "tool_calls_by_name": dict(sorted(calls.items())),
        "tool_errors": tool_errors,
        "format_errors": format_errors,
        "format_error_rate": format_errors / n_turns if n_turns else 0.0,
        "truncated": truncated_n,
        "mean_steps": float(np.mean(steps)) if steps else 0.0,
        "mean_reward": float(np.mean(rewards)) if rewards else 0.0,
        "seconds_per_turn": seconds / n_turns if n_turns else 0.0,
        "traces": str(record_to) if record_to else None,
    }
    assert tuple(summary) == SUMMARY_KEYS
    return summary
