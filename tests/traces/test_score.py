"""Scores: accuracy by stage, IoU, tool failures, answer-evidence consistency, files side by side, PNG chart."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from medgym.cli import main
from medgym.traces import ToolCallRecord, TraceEpisode, TraceHeader, TraceStep, read_traces
from medgym.traces.score import STAGES, evidence_status, score_episodes, score_file


def _numeric(
    final: str | None, measured: list[float], unit: str | None = "mm", tol: float = 0.05, abs_tol: float = 0.5
):
    header = TraceHeader(
        episode_id="e",
        source="phantom",
        seed=0,
        case_id="c",
        stage="measurement",
        template="longest_diameter",
        question="q",
        answer="20.0",
        answer_type="numeric",
        unit=unit,
        tolerance=tol,
        abs_tolerance=abs_tol,
    )
    calls = [
        ToolCallRecord(name="measure", text="t", data={"longest_diameter_mm": v, "components": 1}) for v in measured
    ]
    steps = [TraceStep(index=0, model_text="m", calls=calls)] if calls else []
    return TraceEpisode(header=header, steps=steps, final_answer=final)


def test_answer_evidence_consistency_follows_its_definition():
    assert evidence_status(_numeric("20.9", [20.0])) == "consistent"  # within 5 % of the measured 20.0
    assert evidence_status(_numeric("21.2", [20.0])) == "contradicted"
    assert evidence_status(_numeric("20.3", [20.0], tol=0.0, abs_tol=0.0)) == "contradicted"
    assert evidence_status(_numeric("20", [20.3], tol=0.0, abs_tol=0.0)) == "consistent"  # "20" means 19.5..20.5
    assert evidence_status(_numeric("12", [30.0, 12.0])) == "consistent"  # any measured number counts
    assert evidence_status(_numeric("20.0", [])) == "unsupported"
    assert evidence_status(_numeric(None, [20.0])) == "no_answer"
    assert evidence_status(_numeric("2", [2.0], unit="")) is None  # a count: not a measured quantity
    assert evidence_status(_numeric("40", [20.0], unit="%")) is None
    assert evidence_status(_numeric("21.2", [20.0], unit=None)) == "contradicted"  # unit not recorded: applies
    failed = _numeric("20.0", [20.0])
    failed.steps[0].calls[0].error = True
    assert evidence_status(failed) == "unsupported"  # a failed call is no evidence


def test_stages_are_the_environments_stages():
    from medgym.environments.case import STAGES as ENV_STAGES

    assert STAGES == ENV_STAGES


def test_scores_of_the_mixed_traces(mixed_traces):
    episodes = read_traces(mixed_traces).episodes
    s = score_file(mixed_traces)
    assert s["episodes"] == 8 and s["accuracy"] == 0.5
    for stage, got in s["by_stage"].items():
        eps = [e for e in episodes if e.header.stage == stage]
        assert got["n"] == len(eps)
        assert got["accuracy"] == np.mean([e.score["answer"] == 1.0 for e in eps])
    # Four failing segment calls (box outside the image) and nothing else fails.
    assert s["tools"]["segment"]["errors"] == 4
    segment_calls = sum(c.name == "segment" for e in episodes for st in e.steps for c in st.calls)
    assert s["tools"]["segment"]["failure_rate"] == 4 / segment_calls
    assert all(t["errors"] == 0 for name, t in s["tools"].items() if name != "segment")
    boxes = [e.score["grounding"] for e in episodes if e.score.get("grounding") is not None]
    assert s["n_iou"] == len(boxes) and np.isclose(s["mean_iou"], np.mean(boxes))
    assert s["steps"]["mean"] == np.mean([len(e.steps) for e in episodes])
    wrong_numeric = [e for e in episodes if e.header.answer_type == "numeric" and e.score["answer"] != 1.0]
    assert s["consistency"]["no_answer"] == sum(e.header.unit not in ("", "%") for e in wrong_numeric)


def test_expert_answers_agree_with_their_measurements(expert_traces):
    c = score_file(expert_traces)["consistency"]
    assert c["applicable"] >= 10 and c["rate"] == 1.0


def test_files_side_by_side_and_a_stage_chart(mixed_traces, expert_traces, tmp_path, capsys):
    png = tmp_path / "stages.png"
    assert main(["score", str(expert_traces), str(mixed_traces), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.split() == [f"{expert_traces.parent.name}/traces.jsonl", f"{mixed_traces.parent.name}/traces.jsonl"]
    accuracy = next(line for line in out.splitlines() if line.startswith("accuracy"))
    assert accuracy.split()[1:] == ["100.0%", "50.0%"]
    for stage in STAGES:
        assert any(line.strip().startswith(stage) for line in out.splitlines())
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] >= 300 and img.shape[1] >= 600
    # Two series of bars: matplotlib's first two colours (blue C0, orange C1) are both there.
    blue = np.all(np.abs(img.astype(int) - (31, 119, 180)) < 8, axis=-1).sum()
    orange = np.all(np.abs(img.astype(int) - (255, 127, 14)) < 8, axis=-1).sum()
    assert blue > 500 and orange > 200


def test_score_json_for_several_files(mixed_traces, capsys):
    assert (
        main(
            [
                "score",
                str(mixed_traces),
                str(mixed_traces.parent / ".." / mixed_traces.parent.name / "traces.jsonl"),
                "--json",
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)
    assert len(got) == 2 and all(v["episodes"] == 8 for v in got.values())


def test_no_episodes_scores_to_none():
    s = score_episodes([])
    assert s["accuracy"] is None and s["mean_iou"] is None and s["consistency"]["rate"] is None


def test_chat_questions_without_an_answer_are_not_scored():
    chat = _numeric("12 mm", [12.0])
    chat.header.answer, chat.header.stage = "", "chat"
    graded = _numeric("20.0", [20.0])
    graded.score = {"answer": 1.0}
    s = score_episodes([chat, graded])
    assert s["episodes"] == 2 and s["unscored"] == 1
    assert s["accuracy"] == 1.0 and list(s["by_stage"]) == ["measurement"]
    assert evidence_status(chat) is None and s["consistency"]["applicable"] == 1


def test_score_shows_the_tool_mode_and_warns_across_modes(expert_traces, tmp_path, capsys):
    from medgym.environments.evaluate import evaluate
    from medgym.environments.policies import ExpertPolicy

    evaluate(ExpertPolicy(), n=3, seed=40, out=tmp_path, segmenter="threshold")  # predicted mode
    predicted = tmp_path / "traces.jsonl"
    assert main(["score", str(predicted), str(expert_traces)]) == 0
    out, err = capsys.readouterr()
    assert "tool mode" in out and "predicted" in out and "oracle" in out
    assert "different modes" in err and "upper bound" in err
    assert main(["score", str(predicted), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tool_modes"] == {"predicted": 3}
