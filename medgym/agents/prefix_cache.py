"""Run a prompt's static prefix (system text, tool list) once and reuse its keys and values.

Used by SFT (:func:`medgym.rl.sft.shared_prefix_loss`), GRPO's log-prob pass and rollout turns
(:mod:`medgym.rl.grpo`) and the local backends' turns (:class:`medgym.agents.backends.TransformersBackend`).
Only for models with multimodal RoPE (``get_rope_index``) and a separate language model, whose
positions can be given for the prefix alone.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


def has_multimodal_rope(model) -> bool:
    """Whether the model's forward can be split at a prefix: a language model and ``get_rope_index``."""
    inner = getattr(model, "model", None)
    return hasattr(inner, "get_rope_index") and hasattr(inner, "language_model")


def cache_keyword(model) -> str:
    """``cache`` in transformers >= 5.2x, ``past_key_values`` before (the old name warns until 5.40 drops it)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def prefix_kv(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer for the image-free token prefix ``ids`` (1-D), text positions 0..n-1.

    Computed with gradient when it is enabled (SFT and GRPO's log-prob pass backpropagate through it).
    """
    positions = torch.arange(ids.numel(), device=ids.device).view(1, 1, -1).expand(3, 1, -1)
    return output_kv(model.model.language_model(input_ids=ids[None], position_ids=positions, use_cache=True))


def output_kv(out) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer from a forward's output run with ``use_cache=True``."""
    cached = out["cache"] if "cache" in out else out["past_key_values"]  # renamed in transformers 5.2x
    return [(layer.keys, layer.values) for layer in cached.layers]


def kv_cache(model, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int = 1) -> DynamicCache:
    """A fresh cache holding ``kv`` (batch 1) for ``batch`` rows; tokens appended to it leave ``kv`` as it was."""
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv):
        if batch > 1:
            k, v = k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous()
        cache.update(k, v, i)
    return cache
