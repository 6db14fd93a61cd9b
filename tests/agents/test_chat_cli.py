"""`medgym chat` in the terminal: steps streamed, overlays saved, follow-ups continue the session."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medgym.cli import main


def test_chat_on_an_image_with_the_expert_runs_the_labelled_demo_and_saves_overlays(tmp_path, capsys):
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
                "--backend",
                "expert",
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
    follow_up = ["chat", str(tmp_path / "square.png"), "And its area?", "--out", str(out), "--session", session]
    assert main([*follow_up, "--backend", "expert"]) == 0
    from medgym.agents.graph import AgentContext
    from medgym.agents.session import ChatAgent

    with ChatAgent(out / "chat.sqlite", AgentContext(data_dir=str(out))) as agent:
        questions = [m for m in agent.history(session) if m.get("kind") == "question"]
    assert [q["asked"] for q in questions] == ["How big is the square?", "And its area?"]


def test_chat_over_a_phantom_case_with_the_expert(tmp_path, capsys):
    assert main(["chat", "--case-seed", "2", "--out", str(tmp_path), "--backend", "expert"]) == 0
    printed = capsys.readouterr().out
    assert "expert:" in printed and "ANSWER:" in printed


def test_chat_and_web_default_to_the_embedded_policy_constrained_and_take_backend_specs():
    from medgym.agents.commands import constrained_default
    from medgym.cli import build_parser

    parser = build_parser()
    for command in (["chat", "img.png", "q"], ["web"]):
        args = parser.parse_args(command)
        assert args.backend == "embedded" and constrained_default(args.constrained, args.backend) is True
        args = parser.parse_args([*command, "--no-constrained", "--backend", "embedded:/ckpt"])
        assert args.backend == "embedded:/ckpt" and constrained_default(args.constrained, args.backend) is False
        args = parser.parse_args([*command, "--backend", "openai:qwen@http://127.0.0.1:8000/v1"])
        assert constrained_default(args.constrained, args.backend) is False  # the grammar is a vLLM extension
        assert parser.parse_args([*command, "--backend", "demo"]).backend == "demo"
    with pytest.raises(SystemExit):
        parser.parse_args(["web", "--backend", "gpt"])
    assert parser.parse_args(["eval"]).constrained is False and parser.parse_args(["eval", "--constrained"]).constrained
    assert parser.parse_args(["serve", "--policy", "embedded", "--constrained"]).constrained


def test_chat_on_an_image_runs_the_embedded_policy_constrained_with_the_note(tmp_path, capsys):
    from medgym.agents.session import OUT_OF_DOMAIN_NOTE

    arr = np.full((96, 96), 20, np.uint8)
    arr[40:60, 40:60] = 220
    Image.fromarray(arr).save(tmp_path / "square.png")
    out = tmp_path / "out"
    main(["chat", str(tmp_path / "square.png"), "How big is it?", "--out", str(out), "--max-steps", "1",
          "--segmenter", "threshold"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "embedded" in printed and "!! Format error" not in printed  # constrained: the turn parses
    assert printed.index("ANSWER:") < printed.index(OUT_OF_DOMAIN_NOTE)
    assert json.loads((out / "answer.json").read_text())["note"] == OUT_OF_DOMAIN_NOTE
