"""Tool modes: in predicted mode no tool reads ground truth; oracle mode is the labelled upper bound."""

from __future__ import annotations

import numpy as np
import pytest

from medgym.environments.checks import NAME_ARGUMENTS, check_context, predicted_mode_problems
from medgym.environments.contract import case_messages, system_prompt, tool_schemas
from medgym.environments.evaluate import evaluate
from medgym.environments.expert import expert_calls
from medgym.environments.phantom import DIFFICULTY_LEVELS
from medgym.environments.policies import ExpertPolicy
from medgym.environments.sources import PhantomSource
from medgym.tools import TOOLS, run_tool
from medgym.tools.base import ERR_PREDICTED_NAME


def test_every_name_argument_is_refused_in_predicted_mode():
    assert predicted_mode_problems("threshold") == []
    # The walk covers every tool argument that names a mask or structure.
    for name, spec in TOOLS.items():
        named = {f for f in spec.input_model.model_fields if f in ("structure", "target", "to")}
        assert named <= {k for args in NAME_ARGUMENTS.get(name, ()) for k in args}, name
    ctx = check_context("threshold", "predicted")
    got = run_tool(TOOLS, "segment", {"structure": "lesion"}, ctx)
    assert got.error and ERR_PREDICTED_NAME.format(name="lesion") in got.text and not ctx.masks


def test_oracle_mode_keeps_reading_structures():
    ctx = check_context("threshold", "oracle")
    got = run_tool(TOOLS, "segment", {"structure": "lesion"}, ctx)
    assert not got.error and got.data["mask_id"] == "mask_1"
    measured = run_tool(TOOLS, "measure", {"target": "lesion"}, ctx)
    assert not measured.error and measured.data["longest_diameter_mm"] > 0


def test_predicted_segment_has_no_organ_labels_and_measure_reads_its_own_masks():
    ctx = check_context("threshold", "predicted")
    truth = ctx.study.structures["lesion_1"]
    ys, xs = np.nonzero(truth)
    box = [int(xs.min()) - 2, int(ys.min()) - 2, int(xs.max()) + 3, int(ys.max()) + 3]
    seg = run_tool(TOOLS, "segment", {"box": box}, ctx)
    assert not seg.error and all(c["organ"] is None for c in seg.data["components"])
    m = run_tool(TOOLS, "measure", {"target": seg.data["mask_id"]}, ctx)
    assert not m.error and m.data["area_mm2"] > 0
    region = run_tool(TOOLS, "measure", {"box": box}, ctx)
    assert not region.error and region.data["area_mm2"] >= m.data["area_mm2"]


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_predicted_prompts_name_no_ground_truth_structure(seed):
    case = PhantomSource().case(seed)
    names = [n for n in case.study.structures if n not in ("lesion",)]
    text = "\n".join(m["content"] for m in case_messages(case, "predicted"))
    for n in names:
        assert (
            n not in text.replace(" ", "_").lower()
            or n in case.question.replace(" ", "_").lower()
            or any(n in c.replace(" ", "_") for c in case.choices)
        ), n
    assert "Structures segment can name" not in text
    assert "Structures segment can name" in "\n".join(m["content"] for m in case_messages(case, "oracle")) or not names
    assert "upper bound" in system_prompt("oracle") and "upper bound" not in system_prompt("predicted")
    # The expert's predicted calls prompt with boxes and read only masks it made.
    for call in expert_calls(case, "predicted"):
        assert "structure" not in call.arguments
        for key in ("target", "to"):
            assert call.arguments.get(key) is None or str(call.arguments[key]).startswith("mask_")


def test_tool_schemas_list_no_structure_names():
    text = str(tool_schemas())
    for name in ("spleen", "kidney", "lesion_1", "nucleus", "grey_matter"):  # 'liver' is also a window preset
        assert name not in text


def test_predicted_expert_answers_from_its_own_segmentations():
    summary = evaluate(ExpertPolicy(), n=40, seed=500, segmenter="threshold", tool_mode="predicted")
    assert summary["tool_mode"] == "predicted" and summary["tool_errors"] == 0 and summary["format_errors"] == 0
    assert summary["accuracy"] >= 0.85, summary
    assert 0.3 < summary["mean_prompt_iou"] < 1.0 and summary["mean_mask_dice"] >= 0.85
    assert summary["tool_calls_by_name"]["segment"] >= 30


def test_difficulty_is_recorded_and_makes_the_picture_harder():
    easy, hard = PhantomSource().case(7), PhantomSource(difficulty="harder").case(7)
    assert easy.template == hard.template and easy.answer_type == hard.answer_type
    assert hard.study.meta["difficulty"] == DIFFICULTY_LEVELS["harder"].as_dict()
    assert easy.study.meta["difficulty"] == DIFFICULTY_LEVELS["standard"].as_dict()
    from scipy import ndimage

    def noise(study):  # high-pass residual inside the body: the noise the segmenter must see through
        img = study.plane().astype(float)
        inside = ndimage.binary_erosion(
            study.structures["body"] if study.image.ndim == 2 else study.structures["body"][study.display_slice],
            iterations=5,
        )
        return (img - ndimage.median_filter(img, 5))[inside].std()

    assert noise(hard.study) > 1.3 * noise(easy.study)
    with pytest.raises(ValueError, match="unknown difficulty"):
        PhantomSource(difficulty="impossible")


def test_segment_propagates_a_slice_prompt_through_a_volume():
    source = PhantomSource(templates=["lesion_volume"])
    case = source.case(3)
    truth = case.study.structures["lesion_1"]
    calls = expert_calls(case, "predicted")
    first = next(i for i, c in enumerate(calls) if c.name == "segment")
    assert calls[first].arguments.get("propagate") is True
    from medgym.tools import ToolContext

    ctx = ToolContext(study=case.study, segmenter="threshold")
    for call in calls[:first]:  # the detect call whose candidate the segment prompt names
        run_tool(TOOLS, call.name, call.arguments, ctx)
    seg = run_tool(TOOLS, "segment", calls[first].arguments, ctx)
    mask = ctx.masks[seg.data["mask_id"]]
    assert (mask.sum(axis=(1, 2)) > 0).sum() > 1  # more slices than the prompted one
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice >= 0.8 and "volume" in seg.text


def test_grounding_reward_scores_the_boxes_the_model_wrote():
    from medgym.environments.rewards import grounding_reward

    truth = [40, 40, 60, 60]
    segment = {"name": "segment", "arguments": {"box": [40, 40, 60, 60]}}
    prompted = [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": segment}]},
        # a tool's printed box is not the model's: it never counts
        {"role": "tool", "content": "mask_1: ... component 1 box [40, 40, 60, 60]"},
        {"role": "assistant", "content": "<answer>12.0</answer>"},
    ]
    looked_up = [
        {
            "role": "assistant",
            "content": '<tool_call>{"name": "zoom", "arguments": {"boxes": [[0, 0, 9, 9]]}}</tool_call>',
        },
        {"role": "tool", "content": "mask_1: ... component 1 box [40, 40, 60, 60]"},
        {"role": "assistant", "content": "<answer>12.0</answer>"},
    ]
    half = [{"role": "assistant", "content": "<answer>12.0</answer><box>[40, 40, 60, 80]</box>"}]
    assert grounding_reward([prompted, looked_up, half], answer_box=[truth] * 3) == [1.0, 0.0, 0.5]
