"""The agent graph: expert parity with the env, images reaching the model, errors as messages, budget,
SQLite persistence across processes, the reliability index, and the LangGraph server entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from medgym.agents.backends import BackendUnavailable, DemoBackend, EmbeddedBackend, ScriptedBackend, make_backend
from medgym.agents.graph import (
    ERR_BACKEND,
    ERR_BUDGET,
    AgentContext,
    build_graph,
    decode_mask,
    encode_mask,
    make_graph,
)
from medgym.agents.reliability import agreement, answers_agree
from medgym.agents.session import ChatAgent
from medgym.environments import ENV_ID
from medgym.environments.parsing import ERR_EMPTY
from medgym.environments.policies import ExpertPolicy
from medgym.environments.runner import ERR_TOO_MANY_CALLS, MAX_CALLS_PER_TURN
from medgym.environments.sources import PhantomSource
from medgym.tools import TOOLS
from medgym.tools.base import ERR_BAD_INPUT, ERR_UNKNOWN_TOOL
from medgym.traces import ImageStore, read_traces

REPO = Path(__file__).resolve().parents[2]
ZOOM = '<tool_call>{"name": "zoom", "arguments": {"boxes": [[40, 40, 120, 120]]}}</tool_call>'


def _env_expert_run(seed: int, mode: str) -> tuple[list[str], str | None]:
    """Tool texts and the answer the env gives the expert on one case."""
    from medgym.environments.evaluate import run_episode

    env = gym.make(ENV_ID, segmenter="threshold", tool_mode=mode)
    ep = run_episode(env, ExpertPolicy(tool_mode=mode), seed)
    env.close()
    return [r.observation for r in ep["records"]], ep["info"].get("answer")


@pytest.mark.parametrize("mode", ["oracle", "predicted"])
def test_expert_backend_matches_env_expert_traces_on_20_cases(tmp_path, mode):
    from medgym.environments.expert import expert_calls

    source = PhantomSource()
    ctx = AgentContext(backend="expert", data_dir=str(tmp_path), segmenter="threshold", tool_mode=mode)
    n = 20 if mode == "oracle" else 8
    with ChatAgent(tmp_path / "chat.sqlite", ctx) as agent:
        for seed in range(n):
            case = source.case(seed)
            done = agent.run(f"case-{seed}", "", {"kind": "phantom", "seed": seed})
            messages = agent.history(f"case-{seed}")
            tool_msgs = [m for m in messages if m["role"] == "tool"]
            assert [(m["name"], m["arguments"]) for m in tool_msgs] == [
                (c.name, c.arguments) for c in expert_calls(case, mode)
            ]
            assert not any(m["error"] for m in tool_msgs), seed
            turns = [m["content"] for m in messages if m["role"] == "assistant"]
            if mode == "oracle":
                assert turns[-1] == case.expert_answer
                assert done["status"] == "answered" and done["answer"] == case.answer
            if seed < 4:  # the tool results and the answer are the env's, text for text
                env_texts, env_answer = _env_expert_run(seed, mode)
                assert [m["content"] for m in tool_msgs] == env_texts and env_answer == done["answer"]
            result = next(m for m in messages if m.get("kind") == "result")
            assert result["score"]["correct"] is (True if mode == "oracle" else result["score"]["correct"])
    traces = read_traces(tmp_path / "traces.jsonl")
    assert len(traces.episodes) == n and not traces.problems
    first = traces.episodes[0]
    assert first.header.source == "phantom" and first.header.case_id == "phantom-0"
    assert first.header.tool_mode == mode and first.header.source_spec == "phantom" and first.header.study_hash
    assert [c.name for s in first.steps for c in s.calls] == [c.name for c in expert_calls(source.case(0), mode)]


def test_images_returned_by_tools_reach_the_model(tmp_path):
    backend = ScriptedBackend([ZOOM, "<answer>ok</answer>"])
    ctx = AgentContext(backend=backend, data_dir=str(tmp_path))
    with ChatAgent(tmp_path / "c.sqlite", ctx) as agent:
        agent.run("t", "What is in the top left?", {"kind": "phantom", "seed": 1})
    first, second = backend.calls
    # The system prompt is the contract's; tools travel through tools=, never in the system text.
    assert first[0]["role"] == "system" and '"name": "zoom"' not in first[0]["content"]
    assert first[1]["role"] == "user" and len(first[1]["images"]) >= 1
    tool = [m for m in second if m["role"] == "tool"]
    assert len(tool) == 1 and tool[0]["content"].startswith("[zoom] Zoomed")
    crop = tool[0]["images"][0]
    assert crop.dtype == np.uint8 and crop.ndim == 3 and max(crop.shape[:2]) == 224


def test_tool_errors_and_format_errors_come_back_as_readable_messages(tmp_path):
    turns = [
        '<tool_call>{"name": "scalpel", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "zoom", "arguments": {"boxes": [[5000, 5000, 6000, 6000]]}}</tool_call>',
        "I am not sure.",
        "<answer>no lesion</answer>",
    ]
    backend = ScriptedBackend(turns)
    with ChatAgent(tmp_path / "c.sqlite", AgentContext(backend=backend, data_dir=str(tmp_path))) as agent:
        done = agent.run("t", "Is there a lesion?", {"kind": "phantom", "seed": 2})
        messages = agent.history("t")
    assert done["status"] == "answered" and done["answer"] == "no lesion"
    tool = [m for m in messages if m["role"] == "tool"]
    assert tool[0]["content"] == "[scalpel] " + ERR_UNKNOWN_TOOL.format(name="scalpel", names=", ".join(sorted(TOOLS)))
    assert tool[0]["error"] and tool[1]["error"]
    h, w = PhantomSource().case(2).study.shape2d
    details = f"box [5000.0, 5000.0, 6000.0, 6000.0] lies outside the image (width {w}, height {h}); use coordinates within [0, {w}] x [0, {h}]."
    assert tool[1]["content"] == "[zoom] " + ERR_BAD_INPUT.format(name="zoom", details=details)
    fmt = [m for m in messages if m.get("kind") == "format_error"]
    assert [m["content"] for m in fmt] == [ERR_EMPTY]
    # the model saw all three error texts before answering
    seen = [m["content"] for m in backend.calls[-1]]
    assert ERR_EMPTY in seen and tool[0]["content"] in seen and tool[1]["content"] in seen


def test_step_budget_stops_a_runaway_loop_and_too_many_calls_are_refused(tmp_path):
    many = "".join([ZOOM] * (MAX_CALLS_PER_TURN + 2))
    backend = ScriptedBackend([many, ZOOM])
    ctx = AgentContext(backend=backend, data_dir=str(tmp_path), max_steps=3)
    with ChatAgent(tmp_path / "c.sqlite", ctx) as agent:
        done = agent.run("t", "Loop forever", {"kind": "phantom", "seed": 3})
        messages = agent.history("t")
    assert done["status"] == "truncated" and done["answer"] is None
    assert len(backend.calls) == 3
    assert sum(m["role"] == "tool" for m in messages) == MAX_CALLS_PER_TURN + 2
    assert ERR_TOO_MANY_CALLS.format(limit=MAX_CALLS_PER_TURN, extra=2) in [m["content"] for m in messages]
    assert messages[-2]["content"] == ERR_BUDGET.format(budget=3)


def test_backend_failure_is_reported_and_the_session_survives(tmp_path):
    class Broken:
        model_id = "broken"

        def next_turn(self, messages, *, temperature=0.0):
            raise ConnectionError("endpoint down")

    with ChatAgent(tmp_path / "c.sqlite", AgentContext(backend=Broken(), data_dir=str(tmp_path))) as agent:
        done = agent.run("t", "Anything?", {"kind": "phantom", "seed": 0})
        assert done["status"] == "error"
        assert agent.history("t")[-1]["content"] == ERR_BACKEND.format(details="ConnectionError: endpoint down")
        done = agent.run("t", "Try again", backend=ScriptedBackend(["<answer>fine</answer>"]))
        assert done["status"] == "answered" and done["answer"] == "fine"


def test_masks_round_trip_through_the_image_store(tmp_path):
    store = ImageStore(tmp_path)
    rng = np.random.default_rng(0)
    for shape in ((37, 41), (5, 20, 30)):
        mask = rng.random(shape) > 0.6
        assert np.array_equal(decode_mask(store, encode_mask(store, mask)), mask)


SUBPROCESS_FOLLOW_UP = textwrap.dedent(
    """
    import json, sys
    from medgym.agents.graph import AgentContext
    from medgym.agents.session import ChatAgent
    from medgym.agents.backends import ScriptedBackend
    backend = ScriptedBackend(['<tool_call>{"name": "measure", "arguments": {"target": "mask_1"}}</tool_call>',
                               '<answer>same</answer>'])
    with ChatAgent(sys.argv[1], AgentContext(backend=backend, data_dir=sys.argv[2])) as agent:
        done = agent.run("persist", "And its diameter?")
        seen = [m["content"] for m in backend.calls[0]]
        print(json.dumps({"done": done, "seen": seen, "history": agent.history("persist")}))
    """
)


def test_session_resumes_after_restart_with_history_and_masks(tmp_path):
    db = tmp_path / "chat.sqlite"
    first = ScriptedBackend(
        [
            '<tool_call>{"name": "segment", "arguments": {"box": [90, 90, 170, 170]}}</tool_call>',
            "<answer>one lesion</answer>",
        ]
    )
    agent = ChatAgent(db, AgentContext(backend=first, data_dir=str(tmp_path)))
    assert agent.run("persist", "How many lesions?", {"kind": "phantom", "seed": 4})["answer"] == "one lesion"
    agent.close()
    out = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_FOLLOW_UP, str(db), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["done"]["answer"] == "same"
    # the new process showed the model the earlier question and answer, and mask_1 was still there
    assert "How many lesions?" in "\n".join(result["seen"]) and "<answer>one lesion</answer>" in result["seen"]
    measure = [m for m in result["history"] if m["role"] == "tool" and m["name"] == "measure"][0]
    assert not measure["error"] and "longest diameter" in measure["content"]
    questions = [m for m in result["history"] if m.get("kind") == "question"]
    assert len(questions) == 2 and questions[1]["content"] == "And its diameter?"
    with ChatAgent(db, AgentContext(data_dir=str(tmp_path))) as fresh:  # and a third opening sees it all
        assert "persist" in fresh.threads() and len(fresh.history("persist")) == len(result["history"])


def test_demo_backend_is_labelled_and_answers_with_a_measurement(tmp_path):
    with ChatAgent(tmp_path / "c.sqlite", AgentContext(backend=DemoBackend(), data_dir=str(tmp_path))) as agent:
        done = agent.run("t", "How large is the thing in the middle?", {"kind": "phantom", "seed": 6})
        messages = agent.history("t")
    assert [m["name"] for m in messages if m["role"] == "tool"] == ["zoom", "window", "segment", "measure"]
    assert all("Scripted demo (not a model)" in m["content"] for m in messages if m["role"] == "assistant")
    assert done["status"] == "answered" and "mm" in done["answer"] and done["overlay"]


def test_reliability_index_reports_agreement_of_sampled_runs(tmp_path):
    class Sampler:
        model_id = "sampler"

        def __init__(self):
            self.temperatures = []
            self.answers = iter(["10.0 mm", "10.2 mm", "14 mm", "9.9 mm", "10.1 mm", "10 mm"])

        def next_turn(self, messages, *, temperature=0.0):
            self.temperatures.append(temperature)
            return f"<answer>{next(self.answers)}</answer>"

    backend = Sampler()
    ctx = AgentContext(backend=backend, data_dir=str(tmp_path), reliability_n=5, reliability_temperature=0.8)
    with ChatAgent(tmp_path / "c.sqlite", ctx) as agent:
        done = agent.run("t", "Size?", {"kind": "phantom", "seed": 1})
    rel = done["reliability"]
    assert rel["n"] == 5 and rel["score"] == 0.8 and rel["answers"][1] == "14 mm"
    assert backend.temperatures == [0.0] + [0.8] * 5
    assert agreement(["yes", "Yes.", "no"])["score"] == pytest.approx(0.667)
    case = PhantomSource().case(0)
    assert answers_agree("yes, it grew", "yes", case) if case.answer_type == "yesno" else True


def test_embedded_backend_is_wired_but_says_how_to_get_a_checkpoint(tmp_path):
    with pytest.raises(BackendUnavailable, match="medgym train"):
        EmbeddedBackend(tmp_path / "no-policy")
    with pytest.raises(ValueError, match="--case-seed"):
        make_backend("expert").for_case(None)
    import re

    for path in (REPO / "medgym" / "agents").glob("*.py"):  # agents never import rl
        assert not re.search(r"^\s*(from|import) medgym\.rl", path.read_text(), re.M), path


def test_langgraph_json_points_at_a_compiled_graph():
    spec = json.loads((REPO / "langgraph.json").read_text())
    module, attr = spec["graphs"]["medgym"].split(":")
    assert module.replace(".", "/") + ".py" == "medgym/agents/graph.py"
    import importlib

    factory = getattr(importlib.import_module(module), attr)
    graph = factory()
    assert graph is not None and {"intake", "planner", "tools", "finish"} <= set(graph.get_graph().nodes)
    assert make_graph is factory and build_graph().context_schema is AgentContext


def test_server_style_call_with_a_dict_context(tmp_path):
    """LangGraph's server passes the context as a dict and keeps its own checkpoints."""
    out = make_graph().invoke(
        {"study": {"kind": "phantom", "seed": 2}, "question": ""},
        context={"backend": "expert", "data_dir": str(tmp_path), "segmenter": "threshold"},
    )
    case = PhantomSource().case(2)
    assert out["status"] == "answered" and out["answer"] == case.answer
    assert all(isinstance(m["images"], list) and all(isinstance(h, str) for h in m["images"]) for m in out["messages"])
