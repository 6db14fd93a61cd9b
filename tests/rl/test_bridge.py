"""The TRL bridge: tool methods generated from TOOLS, real tool runs, images back as content blocks."""

from __future__ import annotations

import inspect

import pytest


def test_methods_match_the_registry():
    from transformers.utils import get_json_schema

    from medgym.rl.bridge import MedGymToolEnv
    from medgym.tools import TOOLS

    env = MedGymToolEnv()
    for name, spec in TOOLS.items():
        method = getattr(env, name)
        schema = get_json_schema(method)["function"]
        assert schema["name"] == name
        assert schema["description"] == spec.description
        assert list(schema["parameters"]["properties"]) == list(spec.input_model.model_fields)
        required = [n for n, f in spec.input_model.model_fields.items() if f.is_required()]
        assert schema["parameters"].get("required", []) == required
        assert list(inspect.signature(method).parameters) == list(spec.input_model.model_fields)
    public = [n for n, _ in inspect.getmembers(MedGymToolEnv, predicate=inspect.isfunction) if not n.startswith("_")]
    assert sorted(public) == sorted([*TOOLS, "reset"])  # TRL exposes every public method as a tool


def test_tools_run_on_the_rows_case_and_return_images(tiny_source):
    from medgym.rl.bridge import MedGymToolEnv, ok_calls_among_first

    env = MedGymToolEnv(tool_mode="oracle")  # measures a named structure below
    with pytest.raises(RuntimeError, match="reset"):
        env.zoom(boxes=[[0, 0, 10, 10]])
    with pytest.raises(ValueError, match="case_seed"):
        env.reset(source="phantom")
    env.reset(case_seed=2000, source="phantom", answer="ignored")
    out = env.zoom(boxes=[[10, 10, 100, 100]])
    assert out[0]["type"] == "image" and out[0]["image"].size == (128, 128)
    assert out[-1]["text"].startswith("[zoom] Zoomed crop 1")
    text = env.measure(target="body")
    assert isinstance(text, str) and text.startswith("[measure]")
    bad = env.zoom(boxes=[[5000, 5000, 6000, 6000]])
    assert isinstance(bad, str) and "outside the image" in bad
    assert [c.ok for c in env.calls] == [True, True, False]
    assert env.tool_calls_ok == 2 and ok_calls_among_first(env, 1) == 1
    env.reset(case_seed=2001)
    assert env.calls == []
    honest = MedGymToolEnv()  # predicted mode: a ground-truth name is an error the model reads
    honest.reset(case_seed=2000, source="phantom")
    assert "not available in predicted mode" in honest.measure(target="body") and not honest.calls[0].ok


def test_reset_rebuilds_the_prompted_case_from_a_stage_restricted_source():
    from medgym.environments.sources import PhantomSource
    from medgym.rl.bridge import MedGymToolEnv
    from medgym.rl.grpo import case_row

    stages = ["measurement"]
    for seed in (5, 6, 7):
        case = PhantomSource(stages=stages).case(seed)
        row = case_row(case, stages)
        env = MedGymToolEnv()
        env.reset(**row)
        assert env.case.question == case.question and env.case.answer == case.answer
        assert env.case.stage == "measurement"
    # Without the stages column the same seed names a case of the full mix, which differs here.
    unrestricted = [PhantomSource().case(s).template for s in (5, 6, 7)]
    assert unrestricted != [PhantomSource(stages=stages).case(s).template for s in (5, 6, 7)]


def test_reset_with_a_tool_context_continues_its_calls():
    """A row's ``tool_context`` (the state an evidence prompt's calls left) is where the rollout's tools start: its
    masks can be measured, and a new mask is the rollout's own, not the shared evidence's."""
    from medgym.rl.bridge import MedGymToolEnv
    from medgym.rl.conversation import evidence_prompt

    evidence = MedGymToolEnv(segmenter="threshold", tool_mode="predicted")
    evidence.reset(case_seed=700000)
    evidence_prompt(evidence.case, evidence)  # the expert's calls, run through the real tools
    before = dict(evidence.ctx.masks)
    assert before, "the expert segmented nothing on this case"

    rollout = MedGymToolEnv(segmenter="threshold", tool_mode="predicted")
    rollout.reset(case_seed=700000, tool_context=evidence.ctx)
    assert rollout.measure(target="mask_1").startswith("[measure] mask_1: longest diameter")
    rollout.segment(box=[60, 100, 110, 150])
    assert len(rollout.ctx.masks) == len(before) + 1 and evidence.ctx.masks == before
    fresh = MedGymToolEnv(segmenter="threshold", tool_mode="predicted")
    fresh.reset(case_seed=700000)
    assert "Error" in fresh.measure(target="mask_1")  # without it, the masks are not there
