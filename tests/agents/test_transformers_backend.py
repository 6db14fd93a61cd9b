"""The transformers backend on a tiny randomly initialised Qwen2-VL built offline in the test.

The model writes garbage; the point is the plumbing: the processor's chat template gets the tools,
every image reaches ``generate`` as pixel values, and the loop turns unparsable output into format
errors the model reads, until the step budget stops it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medgym.agents.backends import QWEN_VL_TOOL_TEMPLATE, TransformersBackend
from medgym.agents.graph import ERR_BUDGET, AgentContext
from medgym.agents.session import ChatAgent
from medgym.environments.parsing import ERR_BOTH, ERR_BOX, ERR_CALL_JSON, ERR_CALL_SHAPE, ERR_EMPTY, ERR_MANY_ANSWERS
from medgym.rl.policy_model import SPECIAL_TOKENS
from medgym.tools import TOOLS


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    from medgym.environments.env import system_prompt

    folder = tmp_path_factory.mktemp("tiny-qwen2-vl")
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [
        system_prompt(),
        "What is the size of the lesion? Answer with a number in mm.",
        "zoom segment measure",
    ] * 5
    tok.train_from_iterator(corpus, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    try:
        processor = Qwen2VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_VL_TOOL_TEMPLATE
        )
    except (TypeError, ValueError):
        from transformers import Qwen2VLVideoProcessor

        processor = Qwen2VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(),
            chat_template=QWEN_VL_TOOL_TEMPLATE,
        )
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    b = TransformersBackend(tiny_model_dir, device="cpu", max_new_tokens=12, dtype="float32")
    calls = []
    original = b.model.generate

    def recording_generate(**kwargs):
        calls.append({k: v for k, v in kwargs.items() if k in ("input_ids", "pixel_values", "image_grid_thw")})
        return original(**kwargs)

    b.model.generate = recording_generate
    b.generate_calls = calls
    return b


def test_every_image_reaches_generate_as_pixel_values(backend):
    rgb = lambda h, w: np.random.default_rng(h).integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    messages = [
        {"role": "system", "content": "sys", "images": []},
        {"role": "user", "content": "What is this?", "images": [rgb(64, 64)], "kind": "question"},
        {"role": "assistant", "content": '<tool_call>{"name": "zoom", "arguments": {}}</tool_call>', "images": []},
        {"role": "tool", "name": "zoom", "content": "[zoom] two crops", "images": [rgb(56, 84), rgb(40, 40)]},
    ]
    backend.generate_calls.clear()
    text = backend.next_turn(messages)
    assert isinstance(text, str)
    (call,) = backend.generate_calls
    grid = call["image_grid_thw"]
    assert grid.shape == (3, 3) and call["pixel_values"].shape[0] == int(grid.prod(dim=1).sum())
    n_pad = int((call["input_ids"] == backend.processor.image_token_id).sum())
    assert n_pad == int(grid.prod(dim=1).sum()) // 4  # 2x2 patches merge into one token per image
    prompt = backend.processor.tokenizer.decode(call["input_ids"][0])
    assert "<tools>" in prompt and all(f'"name": "{name}"' in prompt for name in TOOLS)
    assert "<tool_response>" in prompt


def test_loop_handles_garbage_turns_until_the_budget(backend, tmp_path):
    backend.generate_calls.clear()
    ctx = AgentContext(backend=backend, data_dir=str(tmp_path), max_steps=3)
    with ChatAgent(tmp_path / "c.sqlite", ctx) as agent:
        done = agent.run("t", "", {"kind": "phantom", "seed": 2})
        history = agent.history("t")
    assert len(backend.generate_calls) == 3
    assert all(c["pixel_values"] is not None and c["image_grid_thw"].shape[0] >= 1 for c in backend.generate_calls)
    assert done["status"] == "truncated" and done["answer"] is None
    errors = [m["content"] for m in history if m.get("kind") == "format_error"]
    fixed = (ERR_EMPTY, ERR_BOTH, ERR_BOX, ERR_MANY_ANSWERS)
    prefixes = ("Format error: <", ERR_CALL_JSON.split("{")[0], ERR_CALL_SHAPE.split("{")[0])
    assert len(errors) == 3 and all(e in fixed or e.startswith(prefixes) for e in errors), errors
    assert history[-2]["content"] == ERR_BUDGET.format(budget=3)
    # the model was shown its own garbage and the error after it, every turn
    assert json.dumps(errors[0]) in json.dumps([m["content"] for m in history])
