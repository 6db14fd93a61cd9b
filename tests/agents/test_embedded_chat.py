"""The chat's embedded backend runs the shipped checkpoint through the agent loop."""

from __future__ import annotations

import json

from medgym import EMBEDDED_POLICY_DIR
from medgym.agents.backends import EmbeddedBackend, default_embedded_path
from medgym.environments.env import question_images, question_text, system_prompt
from medgym.environments.sources import PhantomSource


def test_the_chat_finds_the_checkpoint_that_training_ships():
    assert default_embedded_path() == EMBEDDED_POLICY_DIR
    assert (EMBEDDED_POLICY_DIR / "model.safetensors").is_file(), "the embedded policy ships with the package"


def test_embedded_backend_runs_the_shipped_checkpoint_on_a_case_image():
    """Loading and generating through the chat's message format (images ride on the messages).

    This checks the plumbing, not the quality of the policy's turns (see medgym train bench for that).
    """
    backend = EmbeddedBackend()
    case = PhantomSource().case(3)
    messages = [
        {"role": "system", "content": system_prompt(), "images": []},
        {"role": "user", "content": question_text(case), "images": question_images(case)},
    ]
    turn = backend.next_turn(messages, temperature=0.0)
    assert isinstance(turn, str) and turn.strip()
    assert backend.model.config.model_type.startswith("qwen")


def test_embedded_backend_prompts_the_policy_with_its_training_system_text(monkeypatch):
    backend = EmbeddedBackend()
    assert backend.system_prompt and "downscaled" in backend.system_prompt
    text = backend.render(
        [{"role": "system", "content": "generic", "images": []}, {"role": "user", "content": "q", "images": []}]
    )
    assert backend.system_prompt in text and "generic" not in text and "q" in text


def test_the_embedded_backend_prompts_with_the_tools_its_checkpoint_recorded():
    """A policy is shown the tool schemas it was trained with (recorded in medgym.json), not today's."""
    from medgym.agents.backends import checkpoint_meta, embedded_path

    backend = EmbeddedBackend()
    recorded = checkpoint_meta(embedded_path("embedded"))["tool_schemas"]
    assert backend.tool_list() == recorded
    text = backend.render(
        [{"role": "system", "content": "s", "images": []}, {"role": "user", "content": "q", "images": []}]
    )
    assert json.dumps(recorded[0]) in text or recorded[0]["function"]["description"] in text
