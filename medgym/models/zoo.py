"""Random-initialised models of real VLM architectures, built offline: ``medgym model init``.

Each architecture of :data:`ARCHS` is built from its transformers config class with the sizes of
:data:`medgym.rl.policy_model.EMBEDDED_SIZES` (``tiny``: seconds to build and to run a turn on a
CPU). All share one tokenizer the project trains itself (:func:`medgym.rl.policy_model.train_tokenizer`:
a small BPE on medgym's prompts and expert conversations), rebuilt per architecture with that
architecture's special tokens (image placeholders, turn markers), and get the architecture's own
image processor fixed to small pictures (112-128 px, 16 image tokens each) and a chat template that
renders ``tools=`` and keeps images in ``tool`` messages: TRL's ``qwen3_vl`` template for the Qwen
family (TRL recognises it, parses its tool calls and knows it is prefix-preserving), medgym's own
``templates/tool_chat.jinja`` with the architecture's markers (:data:`TEMPLATE_STYLES`) for the
others, whose tokenizers carry the :func:`response_template` GRPO parses tool calls with. The
folder loads with ``AutoProcessor`` / ``AutoModelForImageTextToText`` and runs as ``transformers:DIR``;
``medgym.json`` records arch, size, parameters, seed and template. Random weights rarely stop by
themselves, so ``generation_config.max_new_tokens`` caps a turn (:data:`MAX_NEW_TOKENS`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Tokenizer corpus and vocabulary per size: a tiny model needs a tokenizer in seconds, not a good one.
TOKENIZER_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_cases": 12, "vocab_size": 4096},
    "small": {"n_cases": 300, "vocab_size": 8192},
}
# Longest turn (generation_config.max_new_tokens): random weights rarely stop by themselves.
MAX_NEW_TOKENS: dict[str, int] = {"tiny": 32, "small": 96}
ERR_ARCH = "unknown architecture {arch!r}; choose one of: {choices}."
ERR_SIZE = "unknown size {size!r}; choose one of: {choices}."

# medgym's own template per architecture family: how a turn opens and closes, the image placeholder.
TEMPLATE_STYLES: dict[str, dict[str, Any]] = {
    "gemma3": {
        "bos": "<bos>",
        "head": {
            "user": "<start_of_turn>user\n",
            "assistant": "<start_of_turn>model\n",
            "tool": "<start_of_turn>user\n",
        },
        "end": "<end_of_turn>\n",
        "generation": "<start_of_turn>model\n",
        "image": "<start_of_image>",
        "system_in_user": True,  # Gemma has no system turn
    },
    "smolvlm": {
        "bos": "<|im_start|>",
        "head": {"system": "System: ", "user": "User: ", "assistant": "Assistant:", "tool": "User: "},
        "end": "<end_of_utterance>\n",
        "generation": "Assistant:",
        "image": "<image>",
        "system_in_user": False,
    },
}
TRL_TEMPLATE = "trl/qwen3_vl"


def response_template(name: str) -> dict[str, Any] | None:
    """How GRPO parses a completion of template ``name`` into content and tool calls (the tokenizer's ``response_template``).

    None for ``trl/qwen3_vl``: TRL recognises it and sets its own. medgym's templates render Hermes-style
    ``<tool_call>`` JSON like Qwen's, in the style's turn markers; the format is transformers' response
    templates (``transformers.utils.chat_parsing``), that of TRL's ``qwen3_template``.
    """
    if name == TRL_TEMPLATE:
        return None
    family, _, style_name = name.partition(":")
    if family != "medgym/tool_chat" or style_name not in TEMPLATE_STYLES:
        raise ValueError(f"unknown chat template {name!r}")
    style = TEMPLATE_STYLES[style_name]
    return {
        "defaults": {"role": "assistant"},
        "start_anchor": style["generation"],
        "fields": {
            "tool_calls": {
                "open": "<tool_call>",
                "close_pattern": r"</tool_call>\s*",
                "repeats": True,
                "content": "json",
                "transform": {"type": "function", "function": "{content}"},
            },
            "content": {"close_pattern": re.escape(style["end"].strip()) + r"\s*", "content": "text"},
        },
    }


def chat_template(name: str) -> str:
    """A template by its recorded name: ``trl/qwen3_vl`` or ``medgym/tool_chat:STYLE``."""
    if name == TRL_TEMPLATE:
        from medgym.rl.policy_model import trl_chat_template

        return trl_chat_template()
    family, _, style = name.partition(":")
    if family != "medgym/tool_chat" or style not in TEMPLATE_STYLES:
        raise ValueError(f"unknown chat template {name!r}")
    body = resources.files("medgym.models").joinpath("templates/tool_chat.jinja").read_text()
    return "{%- set style = " + json.dumps(TEMPLATE_STYLES[style]) + " -%}\n" + body


# ------------------------------------------------------------------ the shared tokenizer


def tokenizer_corpus(n_cases: int) -> Iterator[str]:
    """The embedded policy's corpus, plus the system and tool block exactly as prompts render them.

    :func:`medgym.rl.policy_model.corpus` renders with plain jinja2, whose ``tojson`` sorts keys and
    escapes HTML; prompts are rendered by transformers' template engine, which does neither. Without
    its tool block in the corpus, a prompt takes about twice the tokens.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    from medgym.environments.contract import system_prompt, tool_schemas
    from medgym.rl.policy_model import corpus, trl_chat_template
    from medgym.tools.base import TOOL_MODES

    yield from corpus(n_cases)
    for mode in TOOL_MODES:
        system = [{"role": "system", "content": system_prompt(mode)}]
        (header,), _ = render_jinja_template([system], tools=tool_schemas(), chat_template=trl_chat_template())
        yield from [header] * n_cases


@cache
def base_tokenizer(size: str):
    """The project's BPE (:func:`medgym.rl.policy_model.train_tokenizer`), trained once per size and process."""
    from medgym.rl.policy_model import train_tokenizer

    sizes = TOKENIZER_SIZES[size]
    return train_tokenizer(tokenizer_corpus(sizes["n_cases"]), sizes["vocab_size"])


def arch_tokenizer(base, eos: str, pad: str, bos: str | None, named: dict[str, str], extra: list[str]):
    """The trained BPE with an architecture's special tokens: ``named`` ones become tokenizer attributes."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()),
        eos_token=eos,
        pad_token=pad,
        bos_token=bos,
        extra_special_tokens=named or None,
    )
    tok.add_special_tokens({"extra_special_tokens": [t for t in extra if t not in tok.get_vocab()]})
    tok.model_max_length = 8192
    return tok


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _generation_config(model, tok, size: str) -> None:
    model.generation_config.max_new_tokens = MAX_NEW_TOKENS[size]
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id


def _qwen_text(tok, s: dict[str, int], mrope: list[int]) -> dict[str, Any]:
    return {
        "vocab_size": len(tok),
        "hidden_size": s["hidden"],
        "intermediate_size": s["mlp"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"],
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        "bos_token_id": tok.convert_tokens_to_ids("<|im_start|>"),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": True,
    }


def _mrope(head_dim: int) -> list[int]:
    """Qwen2-VL's split of a head's rotary half into (time, height, width): 1 : 1.5 : 1.5."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


# ------------------------------------------------------------------ architectures

QWEN_VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _qwen_processor(base, processor_cls: str, video_cls: str, template: str, patch: int = 14):
    """A Qwen-VL processor: pictures of at most 8 x 8 patches, merged 2 x 2 (16 image tokens), at least 4 tokens."""
    import transformers

    from medgym.rl.policy_model import SPECIAL_TOKENS

    tok = arch_tokenizer(base, "<|im_end|>", "<|endoftext|>", None, {}, SPECIAL_TOKENS)
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": (4 * patch) ** 2, "longest_edge": (8 * patch) ** 2},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return getattr(transformers, processor_cls)(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=getattr(transformers, video_cls)(),
        chat_template=chat_template(template),
    )


def _qwen_vl(base, s: dict[str, int], template: str, name: str, vision: dict[str, Any]):
    """A Qwen2-VL-family model (``name``: the transformers class prefix) with the shared text side and tokens."""
    import transformers

    processor = _qwen_processor(base, f"{name}Processor", "Qwen2VLVideoProcessor", template)
    tok = processor.tokenizer
    image, video, start, end = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    config = getattr(transformers, f"{name}Config")(
        text_config=_qwen_text(tok, s, _mrope(s["hidden"] // s["heads"])),
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
        tie_word_embeddings=True,
    )
    model_cls = getattr(transformers, f"{name}ForConditionalGeneration")
    return model_cls._from_config(config, attn_implementation="eager"), processor


def build_qwen2_vl(base, s: dict[str, int], template: str, seed: int):
    vision = {
        "depth": s["v_depth"],
        "embed_dim": s["v_hidden"],
        "hidden_size": s["hidden"],  # the merger's output: the text width
        "num_heads": s["v_heads"],
        "mlp_ratio": s["v_mlp"] // s["v_hidden"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return _qwen_vl(base, s, template, "Qwen2VL", vision)


def build_qwen2_5_vl(base, s: dict[str, int], template: str, seed: int):
    vision = {
        "depth": s["v_depth"],
        "hidden_size": s["v_hidden"],
        "intermediate_size": s["v_mlp"],
        "num_heads": s["v_heads"],
        "out_hidden_size": s["hidden"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,  # windows of 2 x 2 merged tokens; the last block attends globally
        "fullatt_block_indexes": [s["v_depth"] - 1],
    }
    return _qwen_vl(base, s, template, "Qwen2_5_VL", vision)


def build_qwen3_vl(base, s: dict[str, int], template: str, seed: int):
    """The embedded policy's own architecture (:func:`medgym.rl.policy_model.build_model`), 16-px patches."""
    from medgym.rl.policy_model import EMBEDDED_SIZES, build_model

    processor = _qwen_processor(base, "Qwen3VLProcessor", "Qwen3VLVideoProcessor", template, patch=16)
    size = next(name for name, dims in EMBEDDED_SIZES.items() if dims == s)
    return build_model(processor, size=size, seed=seed), processor


IDEFICS3_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


def build_smolvlm(base, s: dict[str, int], template: str, seed: int):
    """SmolVLM (v1): the Idefics3 classes (SmolVLM2's own processor needs ``num2words``)."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tok = arch_tokenizer(base, "<end_of_utterance>", "<|endoftext|>", "<|im_start|>", {}, IDEFICS3_TOKENS)
    side, patch, scale = 128, 16, 2  # 8 x 8 patches, pixel-shuffled 2 x 2: 16 image tokens
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": side},
        max_image_size={"longest_edge": side},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=(side // patch) ** 2 // scale**2,
        chat_template=chat_template(template),
    )
    (image,) = _ids(tok, "<image>")
    config = Idefics3Config(
        image_token_id=image,
        scale_factor=scale,
        tie_word_embeddings=True,
        vision_config={
            "hidden_size": s["v_hidden"],
            "intermediate_size": s["v_mlp"],
            "num_hidden_layers": s["v_depth"],
            "num_attention_heads": s["v_heads"],
            "image_size": side,
            "patch_size": patch,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tok),
            "hidden_size": s["hidden"],
            "intermediate_size": s["mlp"],
            "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv"],
            "max_position_embeddings": 4096,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "tie_word_embeddings": True,
        },
    )
    return Idefics3ForConditionalGeneration._from_config(config, attn_implementation="eager"), processor


GEMMA3_NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def build_gemma3(base, s: dict[str, int], template: str, seed: int):
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tok = arch_tokenizer(base, "<end_of_turn>", "<pad>", "<bos>", GEMMA3_NAMED, ["<start_of_turn>", "<end_of_turn>"])
    side, patch, n_tokens = 128, 16, 16  # 8 x 8 patches, pooled 2 x 2: 16 image tokens
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(
            size={"height": side, "width": side}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
        ),
        tokenizer=tok,
        image_seq_length=n_tokens,
        chat_template=chat_template(template),
    )
    boi, eoi, image = _ids(tok, *GEMMA3_NAMED.values())
    config = Gemma3Config(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": s["hidden"],
            "intermediate_size": s["mlp"],
            "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv"],
            "head_dim": s["hidden"] // s["heads"],
            "query_pre_attn_scalar": s["hidden"] // s["heads"],
            "max_position_embeddings": 4096,
            "sliding_window": 512,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": s["v_hidden"],
            "intermediate_size": s["v_mlp"],
            "num_hidden_layers": s["v_depth"],
            "num_attention_heads": s["v_heads"],
            "image_size": side,
            "patch_size": patch,
            "vision_use_head": False,
        },
        mm_tokens_per_image=n_tokens,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=image,
        tie_word_embeddings=True,
    )
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation="eager")
    # transformers initialises the projector to zeros: every image feature would be 0 and the vision
    # tower would get no gradient. Initialised like the other weights, it sees.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.text_config.initializer_range)
    return model, processor


@dataclass(frozen=True)
class Arch:
    """One architecture: its builder ``(base tokenizer, sizes, template name, seed) -> (model, processor)``.

    Builders other than qwen3_vl's (which seeds itself) rely on :func:`build` seeding torch first.
    """

    name: str
    model_types: tuple[str, ...]  # config.model_type values of real checkpoints this template fits
    template: str
    build: Callable[..., tuple[Any, Any]]


ARCHS: dict[str, Arch] = {
    "qwen2_vl": Arch("qwen2_vl", ("qwen2_vl",), TRL_TEMPLATE, build_qwen2_vl),
    "qwen2_5_vl": Arch("qwen2_5_vl", ("qwen2_5_vl",), TRL_TEMPLATE, build_qwen2_5_vl),
    "qwen3_vl": Arch("qwen3_vl", ("qwen3_vl",), TRL_TEMPLATE, build_qwen3_vl),
    "smolvlm": Arch("smolvlm", ("idefics3", "smolvlm"), "medgym/tool_chat:smolvlm", build_smolvlm),
    "gemma3": Arch("gemma3", ("gemma3",), "medgym/tool_chat:gemma3", build_gemma3),
}


def arch_for_model_type(model_type: str) -> Arch | None:
    """The zoo architecture whose template fits checkpoints of this ``config.model_type`` (None: none does)."""
    return next((a for a in ARCHS.values() if model_type in a.model_types), None)


def build(arch: str, size: str = "tiny", seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) of an architecture with random weights; ``seed`` fixes the weights."""
    import torch

    from medgym.rl.policy_model import EMBEDDED_SIZES

    if arch not in ARCHS:
        raise ValueError(ERR_ARCH.format(arch=arch, choices=", ".join(ARCHS)))
    if size not in EMBEDDED_SIZES or size not in TOKENIZER_SIZES:
        raise ValueError(ERR_SIZE.format(size=size, choices=", ".join(TOKENIZER_SIZES)))
    spec = ARCHS[arch]
    base = base_tokenizer(size)
    torch.manual_seed(seed)  # the one seeding point of a zoo model's weights
    model, processor = spec.build(base, EMBEDDED_SIZES[size], spec.template, seed)
    _generation_config(model, processor.tokenizer, size)
    parsing = response_template(spec.template)
    if parsing is not None:  # saved with the tokenizer (tokenizer_config.json)
        processor.tokenizer.response_template = parsing
    return model.eval(), processor


def init_model(arch: str, out: str | Path, size: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Build an architecture and save it to ``out`` with its ``medgym.json``; returns that record."""
    from medgym.rl.policy_model import n_parameters

    start = time.perf_counter()
    model, processor = build(arch, size, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    meta = {
        "arch": arch,
        "size": size,
        "parameters": n_parameters(model),
        "seed": seed,
        "template": ARCHS[arch].template,
        "model_class": type(model).__name__,
        "max_new_tokens": MAX_NEW_TOKENS[size],
        "random_init": True,
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    (out / "medgym.json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info("built %s (%s, %d parameters) in %s", arch, size, meta["parameters"], out)
    return meta


__all__ = [
    "ARCHS",
    "TEMPLATE_STYLES",
    "arch_for_model_type",
    "build",
    "chat_template",
    "init_model",
    "response_template",
]
