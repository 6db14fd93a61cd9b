"""The embedded policy: build from config, save/reload with Auto classes, the chat template TRL knows."""

from __future__ import annotations

import numpy as np
import pytest


def test_tokenizer_keeps_tags_and_splits_digits(tiny_processor):
    tok = tiny_processor.tokenizer
    text = '<tool_call>\n{"name": "zoom", "arguments": {"boxes": [[10, 20, 30, 40]]}}\n</tool_call>'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.convert_tokens_to_ids("<tool_call>") in ids
    assert [tok.decode([i]) for i in tok("1234", add_special_tokens=False)["input_ids"]] == ["1", "2", "3", "4"]
    assert tok.eos_token == "<|im_end|>"


def test_chat_template_is_trls_and_prefix_preserving(tiny_processor):
    from trl.chat_template_utils import (
        add_response_schema,
        is_chat_template_prefix_preserving,
        qwen3_vl_chat_template,
        supports_tool_calling,
    )

    assert tiny_processor.chat_template == qwen3_vl_chat_template
    assert supports_tool_calling(tiny_processor)
    assert is_chat_template_prefix_preserving(tiny_processor)
    add_response_schema(tiny_processor)  # raises on a template TRL does not know
    parsed = tiny_processor.tokenizer.parse_response(
        '<tool_call>\n{"name": "zoom", "arguments": {"boxes": [[1, 2, 3, 4]]}}\n</tool_call><|im_end|>', prefix=""
    )
    assert parsed["tool_calls"][0]["function"]["name"] == "zoom"


def test_image_is_sixteen_tokens(tiny_processor):
    from PIL import Image

    from medgym.rl.conversation import policy_image

    img = policy_image(np.full((300, 200, 3), 128, np.uint8))
    assert img.size == (128, 128)
    out = tiny_processor(images=[img], text=["<|vision_start|><|image_pad|><|vision_end|>"], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int((out["input_ids"] == tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 16
    assert isinstance(img, Image.Image)


def test_build_save_reload(tiny_processor, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from medgym.rl.policy_model import EMBEDDED_SIZES, build_model, n_parameters, save

    small = build_model(tiny_processor, "small")
    assert 2_000_000 <= n_parameters(small) <= 10_000_000
    model = build_model(tiny_processor, "tiny", seed=1)
    folder = save(model, tiny_processor, tmp_path / "ckpt")
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    proc2 = AutoProcessor.from_pretrained(folder)
    model2 = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model2).__name__ == "Qwen3VLForConditionalGeneration"
    assert proc2.chat_template == tiny_processor.chat_template
    for (n1, p1), (_, p2) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(p1, p2), n1
    with pytest.raises(ValueError, match="unknown embedded size"):
        build_model(tiny_processor, "huge")
    assert set(EMBEDDED_SIZES) >= {"tiny", "small"}


def test_load_missing_checkpoint_says_how_to_fix(tmp_path):
    from medgym.rl.policy_model import load

    with pytest.raises(FileNotFoundError, match="medgym train sft"):
        load(tmp_path)


def test_tokenizer_corpus_is_the_text_the_model_reads(tiny_processor, tiny_source):
    """The corpus renders conversations as ``apply_chat_template`` does (tool schemas in their own key order)."""
    from medgym.environments.contract import tool_schemas
    from medgym.rl.bridge import MedGymToolEnv
    from medgym.rl.conversation import expert_conversation
    from medgym.rl.policy_model import render_text

    conversation, _ = expert_conversation(tiny_source.case(3), MedGymToolEnv())
    text = render_text(conversation, tool_schemas())
    assert text == tiny_processor.apply_chat_template(conversation, tools=tool_schemas(), tokenize=False)
    assert '{"type": "function", "function": {"name": ' in text  # not jinja2's sorted keys
    # A tokenizer trained on that text reads the static part of the prompt in few tokens.
    system = render_text(conversation[:1], tool_schemas())
    assert len(tiny_processor.tokenizer(system)["input_ids"]) < len(system) / 16  # ~1/32; ~1/9 from sorted keys
