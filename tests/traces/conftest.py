"""Trace files made once per session: 100 expert episodes, and a small mixed set with wrong answers.

The mixed set comes from a scripted policy in the env: even cases follow the expert;
odd cases first make a failing segment call (a box outside the image) and a zoom, then
follow the expert's calls, then answer wrongly with a box and with markup in the answer (the
report must escape it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

EXPERT_N = 100
EXPERT_SEED = 1000
MIXED_N = 8
MIXED_SEED = 200
BAD_CALL = '<tool_call>{"name": "segment", "arguments": {"box": [900, 900, 1000, 1000]}}</tool_call>'
ZOOM_CALL = '<tool_call>{"name": "zoom", "arguments": {"boxes": [[40, 40, 160, 160]]}}</tool_call>'
WRONG_ANSWER = "<answer>wrong <script>window.__xss = true</script></answer><box>[20, 20, 120, 120]</box>"


@pytest.fixture(scope="session")
def expert_traces(tmp_path_factory) -> Path:
    from medgym.environments.evaluate import evaluate
    from medgym.environments.policies import ExpertPolicy

    out = tmp_path_factory.mktemp("expert")
    # Oracle mode: known answers, so scoring and reports have exact expectations. Predicted-mode
    # traces replay in tests/traces/test_replay.py::test_predicted_mode_traces_replay_clean.
    summary = evaluate(
        ExpertPolicy(tool_mode="oracle"),
        n=EXPERT_N,
        seed=EXPERT_SEED,
        out=out,
        segmenter="threshold",
        tool_mode="oracle",
    )
    assert summary["accuracy"] == 1.0
    return out / "traces.jsonl"


def run_mixed(out: Path, n: int = MIXED_N, seed: int = MIXED_SEED) -> Path:
    import gymnasium as gym

    from medgym.environments import ENV_ID

    path = out / "traces.jsonl"
    env = gym.make(
        ENV_ID, source="phantom", record_to=path, model_id="scripted-mixed", segmenter="threshold", tool_mode="oracle"
    )
    for i, case_seed in enumerate(range(seed, seed + n)):
        env.reset(seed=case_seed, options={"case_seed": case_seed})
        case = env.unwrapped.case
        calls = [c.as_text() for c in case.expert_calls]
        turns = calls + [case.expert_answer] if i % 2 == 0 else [BAD_CALL, ZOOM_CALL, *calls, WRONG_ANSWER]
        for turn in turns:
            _, _, terminated, truncated, _ = env.step(turn)
            if terminated or truncated:
                break
    env.close()
    return path


@pytest.fixture(scope="session")
def mixed_traces(tmp_path_factory) -> Path:
    return run_mixed(tmp_path_factory.mktemp("mixed"))


def copy_traces(src: Path, dst_dir: Path, lines: list[str] | None = None) -> Path:
    """A trace file in a new folder, sharing the source's images (symlinked folder)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    (dst_dir / "images").symlink_to(src.parent / "images", target_is_directory=True)
    dst = dst_dir / "traces.jsonl"
    if lines is None:
        shutil.copyfile(src, dst)
    else:
        dst.write_text("".join(lines))
    return dst


@pytest.fixture
def trace_copy():
    """``copy_traces`` as a fixture (test modules cannot import conftest under --import-mode=importlib)."""
    return copy_traces
