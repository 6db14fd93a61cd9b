"""The embedded policy's model: a few-million-parameter Qwen3-VL the project builds and trains.

:func:`build_processor` trains a byte-level BPE tokenizer on the project's own text (system
prompt, questions, expert tool calls, tool results and answers of phantom cases) and pairs it
with TRL's own ``qwen3_vl`` chat template (TRL recognises it: it parses tool calls with it and
knows it is prefix-preserving) and a Qwen2-VL image processor fixed to 128 x 128 pictures
(8 x 8 patches of 16 px, merged 2 x 2: 16 image tokens). :func:`build_model` makes a
``Qwen3VLForConditionalGeneration`` with random weights from :data:`EMBEDDED_SIZES`.
Everything saves with ``save_pretrained`` (weights as safetensors) and reloads with
``AutoProcessor`` / ``AutoModelForImageTextToText``.

Running a checkpoint as a policy is the embedded backend's job
(:class:`medgym.agents.backends.EmbeddedBackend`, which reads the ``medgym.json`` that
:func:`save` writes); the shipped one lives in ``medgym/rl/checkpoints/embedded/``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from medgym import EMBEDDED_POLICY_DIR
from medgym.environments.contract import DEFAULT_TOOL_MODE, system_prompt, tool_schemas
from medgym.rl.bridge import MedGymToolEnv
from medgym.rl.conversation import (
    POLICY_IMAGE_SIZE,
    expert_conversation,
    system_message,
)

log = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Added as whole tokens but not "special", so decoding keeps them (the tool-call parser needs them).
TAG_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<answer>",
    "</answer>",
    "<box>",
    "</box>",
]

# Eager attention for SFT: on a CPU, with the shared prefix run once, the suffixes are short and SDPA's
# backward is ~1.5x slower there. GRPO batches whole rollouts (~1,400 tokens each), where SDPA is 2.5-5x
# faster than eager (GRPOConfig.attn_implementation).
ATTENTION = "eager"

# name -> (text: hidden, layers, heads, kv heads, mlp; vision: hidden, depth, heads, mlp)
EMBEDDED_SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden": 64,
        "layers": 2,
        "heads": 2,
        "kv": 1,
        "mlp": 128,
        "v_hidden": 32,
        "v_depth": 1,
        "v_heads": 2,
        "v_mlp": 64,
    },
    "small": {
        "hidden": 192,
        "layers": 4,
        "heads": 4,
        "kv": 2,
        "mlp": 512,
        "v_hidden": 96,
        "v_depth": 2,
        "v_heads": 4,
        "v_mlp": 192,
    },
}


def checkpoint_dir() -> Path:
    """Where the shipped embedded checkpoint lives (package data)."""
    return EMBEDDED_POLICY_DIR


def trl_chat_template() -> str:
    """TRL's qwen3_vl chat template, read from the installed trl package."""
    from trl.chat_template_utils import qwen3_vl_chat_template

    return qwen3_vl_chat_template


# ------------------------------------------------------------------ tokenizer


def corpus(n_cases: int = 300, seed: int = 10_000, source: Any = None) -> Iterator[str]:
    """Text the tokenizer learns from: prompts, questions, expert calls, tool results, answers.

    The case seeds (10000 and up by default) lie outside the training and held-out ranges.
    """
    from medgym.environments.sources import PhantomSource

    tools = tool_schemas()
    yield system_prompt()
    source = source or PhantomSource()
    env = MedGymToolEnv()
    for s in range(seed, seed + n_cases):
        conversation, _ = expert_conversation(source.case(s), env)
        yield render_text(conversation, tools)


def render_text(conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """A conversation as the processor's ``apply_chat_template`` renders it, pictures as placeholders.

    Through transformers' own renderer: its ``tojson`` keeps the schemas' key order, as the prompts
    the model reads do (plain jinja2's sorts keys, which would teach the tokenizer text it never sees).
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        [_text_only(conversation)], tools=tools, chat_template=trl_chat_template(), add_generation_prompt=False
    )
    return rendered[0]


def _text_only(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [p if p.get("type") == "text" else {"type": "image"} for p in content]
        out.append({**m, "content": content})
    return out


def train_tokenizer(texts: Iterator[str], vocab_size: int = 8192):
    """A byte-level BPE whose merges may span words within a line; digits are split one by one.

    Pre-splitting only at newlines and digits lets the static text (system prompt, tool
    schemas, template boilerplate) collapse into a few long tokens, which makes prompts
    several times shorter for a small model on a CPU, while numbers still copy digit by digit.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Whole tokens, but not special: decoding with skip_special_tokens keeps them, as Qwen's tokenizer does.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.model_max_length = 8192
    return fast


def build_processor(n_cases: int = 300, vocab_size: int = 8192, source: Any = None):
    """Tokenizer (trained here), TRL's qwen3_vl chat template, a 128 x 128 image processor."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer = train_tokenizer(corpus(n_cases, source=source), vocab_size)
    pixels = POLICY_IMAGE_SIZE * POLICY_IMAGE_SIZE
    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=trl_chat_template(),
    )


# ------------------------------------------------------------------ model


def build_model(processor, size: str = "small", seed: int = 0):
    """A Qwen3-VL with random weights, sized by :data:`EMBEDDED_SIZES`."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if size not in EMBEDDED_SIZES:
        raise ValueError(f"unknown embedded size {size!r}; choose one of {sorted(EMBEDDED_SIZES)}")
    s = EMBEDDED_SIZES[size]
    tok = processor.tokenizer
    head_dim = s["hidden"] // s["heads"]
    quarter = head_dim // 2
    mrope = [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]
    ids = {name: tok.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": s["hidden"],
            "intermediate_size": s["mlp"],
            "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv"],
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": mrope,
                "mrope_interleaved": True,
            },
            "tie_word_embeddings": True,
            "bos_token_id": ids["<|im_start|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": s["v_depth"],
            "hidden_size": s["v_hidden"],
            "intermediate_size": s["v_mlp"],
            "num_heads": s["v_heads"],
            "out_hidden_size": s["hidden"],
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration._from_config(config, attn_implementation=ATTENTION)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|im_start|>"]
    return model


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save(
    model,
    processor,
    out: str | Path,
    meta: dict[str, Any] | None = None,
    tool_mode: str = DEFAULT_TOOL_MODE,
    tools: list[dict[str, Any]] | None = None,
) -> Path:
    """Weights (safetensors), processor files and ``medgym.json`` (``meta``, the system text and the tool
    schemas it was trained with: ``tools``, else those ``meta`` records, else the contract's) in one folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if meta is not None:
        write_meta(out, meta, tool_mode, tools)
    return out


def write_meta(
    folder: Path, meta: dict[str, Any], tool_mode: str = DEFAULT_TOOL_MODE, tools: list[dict[str, Any]] | None = None
) -> None:
    """``folder/medgym.json``: ``meta`` with the system text and the tool schemas the policy was trained with
    (``tools``, else those ``meta`` records, else the contract's), so its backend prompts it exactly that way."""
    meta = {
        **meta,
        "system_prompt": system_message(tool_mode),
        "tool_schemas": tools or meta.get("tool_schemas") or tool_schemas(),
    }
    (folder / "medgym.json").write_text(json.dumps(meta, indent=1))


def load(path: str | Path, attention: str = ATTENTION):
    """(model, processor) from a folder written by :func:`save`; offline, CPU, fp32, eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no checkpoint in {path}: expected config.json and model.safetensors (train one with `medgym train sft`)"
        )
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation=attention)
    model.eval()
    return model, processor


__all__ = [
    "EMBEDDED_SIZES",
    "build_model",
    "build_processor",
    "checkpoint_dir",
    "load",
    "save",
    "system_message",
    "write_meta",
]
