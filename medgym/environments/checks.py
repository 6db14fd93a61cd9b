"""`medgym check`: Gymnasium's check_env on the env and check_tool on every registered tool."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.utils.env_checker import check_env

from medgym.environments import ENV_ID
from medgym.environments.phantom import add_lesion, anatomy, render
from medgym.tools import TOOLS, ToolContext
from medgym.tools.checker import ToolCheckError, check_tool


def check_context(segmenter: str = "threshold", tool_mode: str = "oracle") -> ToolContext:
    """The standard context tool examples are written for: a 256 x 256 phantom CT slice
    with ``body``, organs, ``lesion``/``lesion_1`` and an all-empty ``empty`` structure.

    Oracle by default: the examples name those structures. :func:`predicted_mode_problems`
    checks that predicted mode refuses every such name."""
    rng = np.random.default_rng(7)
    plan = anatomy(rng, "ct2d", 256)
    add_lesion(rng, plan, "liver", 20.0, 5.0)
    study = render(plan, seed=7)
    study.structures["empty"] = np.zeros(study.image.shape, dtype=bool)
    return ToolContext(study=study, segmenter=segmenter, tool_mode=tool_mode)  # type: ignore[arg-type]


# Arguments of each tool that name a mask or structure: in predicted mode a ground-truth name must be refused.
NAME_ARGUMENTS: dict[str, tuple[dict[str, object], ...]] = {
    "segment": ({"structure": "lesion"}, {"structure": "lesion_1"}, {"structure": "liver"}, {"structure": "body"}),
    "measure": ({"target": "lesion"}, {"target": "liver"}, {"target": "mask_1", "to": "body"}),
}


def predicted_mode_problems(segmenter: str = "threshold") -> list[str]:
    """Ground-truth names that reach a mask in predicted mode (empty: none do)."""
    from medgym.tools import run_tool

    problems = []
    for name, cases in NAME_ARGUMENTS.items():
        for args in cases:
            ctx = check_context(segmenter, "predicted")
            if "to" in args:  # a real mask first, so only the ground-truth name can fail
                run_tool(TOOLS, "segment", {"box": [60, 60, 140, 140]}, ctx)
            result = run_tool(TOOLS, name, dict(args), ctx)
            if not result.error or "not available in predicted mode" not in result.text:
                problems.append(f"{name}({args}) in predicted mode: {result.text[:120]}")
    return problems


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


def run_checks(segmenter: str = "threshold") -> list[CheckResult]:
    results = []
    for name, spec in TOOLS.items():
        try:
            done = check_tool(spec, lambda: check_context(segmenter))
            results.append(CheckResult(f"tool:{name}", True, ", ".join(done)))
        except ToolCheckError as exc:
            results.append(CheckResult(f"tool:{name}", False, str(exc)))
    leaks = predicted_mode_problems(segmenter)
    results.append(
        CheckResult("tools:predicted-mode", not leaks, "; ".join(leaks) or "no ground-truth name reaches a mask")
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            env = gym.make(ENV_ID, segmenter=segmenter)
            check_env(env.unwrapped, skip_render_check=False)
            env.close()
            problems = [f"{w.category.__name__}: {w.message}" for w in caught]
            results.append(
                CheckResult(f"env:{ENV_ID}", not problems, "; ".join(problems) or "check_env passed, no warnings")
            )
        except Exception as exc:  # noqa: BLE001 - report, the CLI exits non-zero
            results.append(CheckResult(f"env:{ENV_ID}", False, f"{type(exc).__name__}: {exc}"))
    return results
