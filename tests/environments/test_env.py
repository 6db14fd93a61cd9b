"""MedVQAEnv: Gymnasium's checker, seeding, vector envs, malformed turns, budget, recording."""

from __future__ import annotations

import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from medgym.environments import ENV_ID, MAX_EPISODE_STEPS
from medgym.environments.env import system_prompt, tool_schemas
from medgym.environments.parsing import ERR_BOTH, ERR_EMPTY
from medgym.environments.rewards import FORMAT_PENALTY
from medgym.tools import TOOLS
from medgym.tools.base import ERR_UNKNOWN_TOOL


def make(**kw):
    return gym.make(ENV_ID, segmenter="threshold", **kw)


def test_check_env_passes_without_warnings():
    env = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert [str(w.message) for w in caught] == []


def test_same_seed_same_case_and_observation():
    a, b = make(), make()
    oa, ia = a.reset(seed=123)
    ob, ib = b.reset(seed=123)
    assert ia["case_id"] == ib["case_id"] and oa["text"] == ob["text"]
    assert np.array_equal(oa["images"], ob["images"])
    oc, _ = a.reset(seed=124)
    assert oc["text"] != oa["text"] or not np.array_equal(oc["images"], oa["images"])


def test_scripted_turns_valid_wrong_and_no_call():
    env = make()
    obs, info = env.reset(seed=5)
    # Tools reach the model through tools= (the contract's schemas), never pasted into the system text.
    assert [t["function"]["name"] for t in tool_schemas()] == sorted(TOOLS)
    assert not any(f'"{name}"' in system_prompt() for name in TOOLS)
    # one valid call
    box = [40, 40, 120, 120]
    obs, r, term, trunc, info = env.step(
        f'<tool_call>{{"name": "zoom", "arguments": {{"boxes": [{box}]}}}}</tool_call>'
    )
    assert (r, term, trunc) == (0.0, False, False) and obs["n_images"] == 1 and "[zoom] Zoomed" in obs["text"]
    assert info["tool_errors"] == 0
    # one wrong call: unknown tool, readable error, not fatal
    obs, r, term, _, info = env.step('<tool_call>{"name": "scalpel", "arguments": {}}</tool_call>')
    assert ERR_UNKNOWN_TOOL.format(name="scalpel", names=", ".join(sorted(TOOLS))) in obs["text"]
    assert info["tool_errors"] == 1 and not term
    # no call at all, and a call mixed with an answer: format penalty, episode goes on
    for text, message in (
        ("I think it is fine.", ERR_EMPTY),
        ('<tool_call>{"name": "zoom"}</tool_call><answer>x</answer>', ERR_BOTH),
    ):
        obs, r, term, _, info = env.step(text)
        assert r == FORMAT_PENALTY and not term and obs["text"] == message
    # non-string actions and broken JSON never raise
    for bad in (None, 42, '<tool_call>{"name": zoom}</tool_call>', "<answer>unclosed"):
        obs, r, term, _, _ = env.step(bad)
        assert r == FORMAT_PENALTY and obs["text"].startswith("Format error")


def test_answer_ends_the_episode_with_reward_parts():
    env = make()
    env.reset(seed=11)
    case = env.unwrapped.case
    obs, r, term, trunc, info = env.step(case.expert_answer)
    assert term and not trunc and info["correct"]
    assert info["reward_parts"]["answer"] == 1.0 and info["reward_parts"]["tool_use"] == 0.0  # no tool ran
    with pytest.raises(gym.error.ResetNeeded):
        env.step("<answer>again</answer>")


def test_answer_in_the_wrong_form_earns_no_format_reward():
    """A number to a lettered question parses but is not an answer to it: format 0, as the evaluation counts it."""
    from medgym.environments.evaluate import evaluate

    class Number:
        model_id = "number"

        def next_turn(self, messages, *, temperature=0.0):
            return "<answer>13.8</answer>"

    rows: list[dict] = []
    summary = evaluate(Number(), n=12, seed=0, segmenter="threshold", per_case=rows)
    env = make()
    kinds = []
    for seed in range(12):
        env.reset(seed=seed, options={"case_seed": seed})
        kinds.append(env.unwrapped.case.answer_type)
        *_, info = env.step("<answer>13.8</answer>")
        assert info["reward_parts"]["format"] == float(kinds[-1] == "numeric")
    assert {"numeric"} < set(kinds)  # both forms among these cases
    assert [r["answer_form"] for r in rows] == [k == "numeric" for k in kinds]
    assert summary["answer_form"] == pytest.approx(np.mean([k == "numeric" for k in kinds]))
    assert summary["format_errors"] == 0  # well formed: the form is scored, not rejected


def test_step_budget_truncates():
    env = make()
    env.reset(seed=2)
    for _i in range(MAX_EPISODE_STEPS):
        _, _, term, trunc, _ = env.step("nothing useful")
        assert not term
    assert trunc


@pytest.mark.parametrize("vector_cls", [gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv])
def test_vector_envs(vector_cls):
    kwargs = {"shared_memory": False} if vector_cls is gym.vector.AsyncVectorEnv else {}
    envs = vector_cls([lambda: make() for _ in range(2)], **kwargs)
    obs, infos = envs.reset(seed=[1, 2])
    assert obs["images"].shape[0] == 2 and len(obs["text"]) == 2
    actions = ('<tool_call>{"name": "window", "arguments": {"preset": "bone"}}</tool_call>', "<answer>yes</answer>")
    obs, rewards, term, trunc, infos = envs.step(actions)
    assert list(term) == [False, True] and obs["n_images"][0] == 1
    envs.close()


def test_recording_writes_one_episode_per_line_with_images(tmp_path):
    path = tmp_path / "traces.jsonl"
    env = make(record_to=path, model_id="scripted")
    for seed in (1, 2):
        env.reset(seed=seed)
        case = env.unwrapped.case
        for call in case.expert_calls:
            env.step(call.as_text())
        env.step(case.expert_answer)
    env.reset(seed=3)
    env.step("not an action")
    env.close()  # the unfinished third episode is written as truncated
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 3
    assert lines[0]["header"]["model_id"] == "scripted" and lines[0]["header"]["schema_version"] == 1
    assert lines[0]["score"]["answer"] == 1.0 and not lines[0]["truncated"]
    assert lines[2]["truncated"] and lines[2]["steps"][0]["format_error"]
    hashes = {lines[0]["header"]["image"]} | {h for s in lines[0]["steps"] for c in s["calls"] for h in c["images"]}
    assert all((tmp_path / "images" / f"{h}.png").exists() for h in hashes)


def test_import_medgym_registers_the_env_and_imports_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys, gymnasium as gym, medgym\n"
        "assert 'medgym/MedVQA-v0' in gym.registry\n"
        "assert not any(m.startswith(('medgym.environments', 'torch')) for m in sys.modules)\n"
        "env = gym.make('medgym/MedVQA-v0', segmenter='threshold')\n"
        "obs, info = env.reset(seed=0)\n"
        "assert obs['n_images'] >= 1 and env.unwrapped.tool_mode == 'predicted'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize("blind", [False, True])
def test_blind_evaluation_hides_the_pictures_not_the_tools(blind):
    """``evaluate(blind=True)`` (``medgym eval --blind``, bench ``blind:PATH``) shows the policy every picture black,
    the question's and the tool's, at their shapes, while the tool still runs on the study and its text comes back."""
    from medgym.environments.evaluate import evaluate

    seen: list[list[dict]] = []

    class Looker:
        model_id = "looker"

        def next_turn(self, messages, *, temperature=0.0):
            seen.append(messages)
            if not any(m["role"] == "tool" for m in messages):
                return '<tool_call>{"name": "zoom", "arguments": {"boxes": [[10, 10, 90, 90]]}}</tool_call>'
            return "<answer>no</answer>"

    summary = evaluate(Looker(), n=2, seed=3, tool_mode="predicted", blind=blind, segmenter="threshold")
    assert summary["blind"] is blind and summary["tool_calls"] == 2 and summary["tool_errors"] == 0
    last = seen[-1]
    question = next(m for m in last if m["role"] == "user")
    tool = next(m for m in last if m["role"] == "tool")
    assert question["images"] and tool["images"] and tool["content"].startswith("[zoom]")
    assert tool["images"][0].shape[:2] != question["images"][0].shape[:2]  # the crop, kept at its own size
    brightest = max(int(np.asarray(im).max()) for m in last for im in m["images"])
    assert (brightest == 0) is blind, brightest
