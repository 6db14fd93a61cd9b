"""Traces to SFT data: a datasets Dataset in TRL's conversational VLM format, with images and tool turns."""

from __future__ import annotations

import json

import pytest
from datasets import load_from_disk
from PIL import Image

from medgym.cli import main
from medgym.traces import read_traces


def _placeholders(messages) -> int:
    return sum(part["type"] == "image" for m in messages for part in m["content"])


@pytest.fixture(scope="module")
def exported(mixed_traces, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "ds"
    assert main(["export-sft", str(mixed_traces), "--out", str(out), "--correct-only"]) == 0
    return load_from_disk(str(out))


def test_export_loads_with_images_and_tool_turns(exported, mixed_traces):
    from medgym.environments.env import system_prompt

    episodes = [e for e in read_traces(mixed_traces).episodes if e.score.get("answer") == 1.0]
    assert len(exported) == len(episodes) == 4
    assert set(exported.column_names) == {"messages", "images", "stage", "template", "answer", "answer_type", "case_id"}
    for row, ep in zip(exported, episodes, strict=True):
        msgs = row["messages"]
        assert row["case_id"] == ep.header.case_id and row["answer"] == ep.header.answer
        assert [m["role"] for m in msgs[:2]] == ["system", "user"]
        assert msgs[0]["content"] == [{"type": "text", "text": system_prompt(ep.header.tool_mode)}]
        assert {m["role"] for m in msgs} == {"system", "user", "assistant", "tool"}
        # Assistant turns are the raw model text, tool calls included; the last one answers.
        assistant = [m["content"][0]["text"] for m in msgs if m["role"] == "assistant"]
        assert assistant == [s.model_text for s in ep.steps]
        assert "<tool_call>" in assistant[0] and assistant[-1].startswith("<answer>")
        tools = [m for m in msgs if m["role"] == "tool"]
        assert [t["content"][0]["text"] for t in tools] == [c.text for s in ep.steps for c in s.calls]
        # Images: one per placeholder, in order, as PIL images; the question image comes first.
        assert len(row["images"]) == _placeholders(msgs) >= 2
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in row["images"])
        assert msgs[1]["content"][0] == {"type": "image", "text": None}
        assert any(part["type"] == "image" for t in tools for part in t["content"])  # a segment overlay
        first = read_image(mixed_traces, ep.header.image)
        assert row["images"][0].tobytes() == first.tobytes()


def read_image(path, digest):
    return Image.open(path.parent / "images" / f"{digest}.png").convert("RGB")


def test_filters_by_stage_and_source(mixed_traces, tmp_path, capsys):
    episodes = read_traces(mixed_traces).episodes
    stage = episodes[0].header.stage
    out = tmp_path / "ds"
    assert main(["export-sft", str(mixed_traces), "--out", str(out), "--stage", stage, "--source", "phantom"]) == 0
    stats = json.loads(capsys.readouterr().out)
    ds = load_from_disk(str(out))
    assert len(ds) == stats["kept"] == sum(e.header.stage == stage for e in episodes)
    assert set(ds["stage"]) == {stage}
    assert main(["export-sft", str(mixed_traces), "--out", str(tmp_path / "none"), "--source", "nowhere"]) == 2
    assert "no episode left to export" in capsys.readouterr().err


def test_trl_fills_every_image_placeholder_with_tool_images_in_user_turns(mixed_traces, tmp_path):
    from trl.data_utils import prepare_multimodal_messages

    out = tmp_path / "ds"
    assert main(["export-sft", str(mixed_traces), "--out", str(out), "--tool-images", "user"]) == 0
    ds = load_from_disk(str(out))
    for row in ds:
        assert not any(p["type"] == "image" for m in row["messages"] if m["role"] == "tool" for p in m["content"])
        filled = prepare_multimodal_messages(row["messages"], row["images"])
        given = [p["image"] for m in filled for p in m["content"] if p["type"] == "image"]
        assert len(given) == len(row["images"]) >= 1
