"""`medgym chat` in the terminal: steps streamed, overlays saved, follow-ups continue the session."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from medgym.cli import main


def test_chat_on_an_image_runs_the_labelled_demo_and_saves_overlays(tmp_path, capsys):
    arr = np.full((120, 160), 20, np.uint8)
    arr[45:75, 65:95] = 220
    Image.fromarray(arr).save(tmp_path / "square.png")
    out = tmp_path / "out"
    assert (
        main(
            [
                "chat",
                str(tmp_path / "square.png"),
                "How big is the square?",
                "--out",
                str(out),
                "--segmenter",
                "threshold",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "SCRIPTED DEMO (not a model)" in captured.err
    printed = captured.out
    assert (
        printed.index("-> zoom")
        < printed.index("-> window")
        < printed.index("-> segment")
        < printed.index("-> measure")
    )
    assert "ANSWER: 41.0 mm" in printed  # the 30 px square's diagonal between pixel centres, 29 * sqrt(2), at 1 mm/px
    assert (out / "answer_overlay.png").is_file() and (out / "step3_segment_1.png").is_file()
    overlay = np.asarray(Image.open(out / "answer_overlay.png"))
    assert overlay.shape == (120, 160, 3) and (overlay[..., 0] != overlay[..., 1]).any()  # tinted mask and box
    answer = json.loads((out / "answer.json").read_text())
    assert answer["status"] == "answered"
    # a follow-up in the same session sees the first question
    session = answer["thread_id"]
    assert main(["chat", str(tmp_path / "square.png"), "And its area?", "--out", str(out), "--session", session]) == 0
    from medgym.agents.graph import AgentContext
    from medgym.agents.session import ChatAgent

    with ChatAgent(out / "chat.sqlite", AgentContext(data_dir=str(out))) as agent:
        questions = [m for m in agent.history(session) if m.get("kind") == "question"]
    assert [q["asked"] for q in questions] == ["How big is the square?", "And its area?"]


def test_chat_over_a_phantom_case_with_the_expert(tmp_path, capsys):
    assert main(["chat", "--case-seed", "2", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "expert:" in printed and "ANSWER:" in printed
