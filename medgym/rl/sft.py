"""SFT cold start: expert episodes as multi-turn, multimodal tool conversations.

:func:`expert_conversation` replays a case's expert trace through the same bridge GRPO uses
(:class:`~medgym.rl.bridge.MedGymToolEnv`): system, user (question pictures + text), then for
each expert call an assistant turn with a structured ``tool_calls`` entry and a tool turn
with the tool's real pictures and text, then the expert's ``<answer>``.

Training is a lean torch loop rather than TRL's ``SFTTrainer``: assistant-only loss on a VLM
conversation needs the assistant mask *after* image-token expansion, and TRL 1.16 computes
it before expansion without re-aligning (see ``trl.chat_template_utils.
is_chat_template_stop_token_trained``), so with tool images in the middle of a conversation
the mask would be shifted. Here the mask is found on the final token ids: every span from
``<|im_start|>assistant\\n`` to its ``<|im_end|>`` (inclusive, so the model learns to stop).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medgym.environments.case import Case
from medgym.rl.bridge import MedGymToolEnv, start_case
from medgym.rl.conversation import multimodal_prompt

log = logging.getLogger(__name__)


def expert_conversation(case: Case, env: MedGymToolEnv | None = None) -> tuple[list[dict[str, Any]], int]:
    """The expert episode of a case as chat messages (multimodal content blocks); also the number of pictures."""
    env = env or MedGymToolEnv()
    start_case(env, case)  # the very case given (it may not come from a seed), not rebuilt
    messages = multimodal_prompt(case)
    for call in case.expert_calls:
        messages.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}],
            }
        )
        result = env._call(call.name, dict(call.arguments))
        if isinstance(result, str):
            result = [{"type": "text", "text": result}]
        messages.append({"role": "tool", "name": call.name, "content": result})
    messages.append({"role": "assistant", "content": [{"type": "text", "text": case.expert_answer}]})
    n_images = sum(
        1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p.get("type") == "image"
    )
    return messages, n_images


def assistant_mask(input_ids: list[int], tokenizer) -> list[int]:
    """1 on assistant-generated tokens (content, tool calls and the closing ``<|im_end|>``), else 0."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer.encode("assistant\n", add_special_tokens=False)
    mask = [0] * len(input_ids)
    i = 0
    while i < len(input_ids):
        if input_ids[i] == start and input_ids[i + 1 : i + 1 + len(header)] == header:
            j = i + 1 + len(header)
            while j < len(input_ids) and input_ids[j] != end:
                mask[j] = 1
                j += 1
            if j < len(input_ids):
                mask[j] = 1
            i = j
        i += 1
    return mask


def encode_conversation(
    processor, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """Model inputs (batch of one: ids, pixels, grids, mm token types) and labels (-100 outside assistant turns) for one conversation."""
    enc = processor.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=False
    )
    ids = enc["input_ids"]
    mask = torch.tensor([assistant_mask(ids[0].tolist(), processor.tokenizer)], dtype=torch.bool)
    out = {k: v for k, v in enc.items() if k != "attention_mask"}
    out["labels"] = torch.where(mask, ids, torch.full_like(ids, -100))
    return out


def direct_conversation(case: Case) -> list[dict[str, Any]]:
    """The no-tools baseline's conversation: the question, then the expert's answer straight away."""
    return [*multimodal_prompt(case), {"role": "assistant", "content": [{"type": "text", "text": case.expert_answer}]}]


def shared_prefix_length(examples: list[dict[str, Any]], turn_start: int) -> int:
    """Length of the token prefix all examples share, cut back to a turn start (0 if none).

    Every conversation opens with the same system text and tool list (about 730 of ~1000
    tokens), so :func:`shared_prefix_loss` runs it once per group instead of once per example.
    """
    rows = [ex["input_ids"][0] for ex in examples]
    n = min(len(r) for r in rows)
    for r in rows[1:]:
        diff = (r[:n] != rows[0][:n]).nonzero()
        if len(diff):
            n = int(diff[0])
    starts = (rows[0][:n] == turn_start).nonzero()
    # The cut must sit before a turn start so that no example has an image or label inside the prefix.
    cut = int(starts[-1]) if len(starts) else 0
    if any((ex["labels"][0, :cut] != -100).any() or (ex["mm_token_type_ids"][0, :cut] != 0).any() for ex in examples):
        return 0
    return cut


def shared_prefix_loss(model, examples: list[dict[str, Any]], prefix: int) -> torch.Tensor:
    """Mean next-token loss of the examples, running their common ``prefix`` tokens once.

    The prefix's keys and values are computed once (with gradient) and reused by each example's
    suffix; the suffix gets its multimodal RoPE positions from the whole sequence, so the loss
    equals the full forward's (``tests/rl/test_sft.py`` checks losses and gradients).
    """
    from transformers import DynamicCache

    if prefix == 0:
        return sum(model(**ex).loss for ex in examples) / len(examples)
    text_positions = torch.arange(prefix).view(1, 1, -1).expand(3, 1, -1)
    cached = model.model.language_model(
        input_ids=examples[0]["input_ids"][:, :prefix], position_ids=text_positions, use_cache=True
    ).past_key_values
    kv = [(layer.keys, layer.values) for layer in cached.layers]
    total = torch.zeros(())
    for ex in examples:
        positions, _ = model.model.get_rope_index(
            ex["input_ids"], ex["mm_token_type_ids"], image_grid_thw=ex.get("image_grid_thw")
        )
        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        suffix = {k: ex[k][:, prefix:] for k in ("input_ids", "mm_token_type_ids", "labels")}
        images = {k: ex[k] for k in ("pixel_values", "image_grid_thw") if k in ex}
        out = model(**suffix, **images, position_ids=positions[:, :, prefix:], past_key_values=cache, use_cache=True)
        total = total + out.loss
    return total / len(examples)


@dataclass
class SFTResult:
    steps: int
    final_loss: float
    seconds: float
    checkpoint: str | None


def train_sft(
    model,
    processor,
    cases: Sequence[Case],
    *,
    epochs: float = 1.0,
    learning_rate: float = 1e-3,
    grad_accum: int = 4,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.05,
    seed: int = 0,
    with_tools: bool = True,
    out_dir: str | Path | None = None,
    save_steps: int = 0,
    resume: bool = False,
    log_fn: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> SFTResult:
    """Next-token loss on assistant tokens of the cases' conversations (groups of ``grad_accum``).

    With tools, a case becomes its expert conversation (tool calls and real tool results);
    without (``with_tools=False``, the no-tools baseline) the question is answered directly.
    Conversations are built when drawn, so ``cases`` may be a lazy sequence of thousands
    (:class:`medgym.environments.sources.CaseRange`) without holding their pictures in memory.
    """
    from tqdm import tqdm

    from medgym.rl.policy_model import tool_schemas_cached

    tools = tool_schemas_cached() if with_tools else None
    env = MedGymToolEnv()
    turn_start = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")

    @functools.lru_cache(maxsize=64)  # small case lists (tests, demos) are encoded once
    def example(index: int) -> dict[str, Any]:
        case = cases[index]
        messages = expert_conversation(case, env)[0] if with_tools else direct_conversation(case)
        return encode_conversation(processor, messages, tools)

    total_steps = max(1, math.ceil(len(cases) * epochs / grad_accum))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    warmup = max(1, int(total_steps * warmup_ratio))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start_step = 0
    loss_value = float("nan")
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is not None:
        state_file = _latest_state(out)
        if state_file is not None:
            state = torch.load(state_file, weights_only=False)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_step = int(state["step"])
            loss_value = float(state.get("loss", float("nan")))
            log.info("resumed SFT from %s at step %d", state_file, start_step)
    rng = random.Random(seed)
    order = [i for _ in range(math.ceil(epochs) + 1) for i in rng.sample(range(len(cases)), len(cases))]
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start_step, total_steps), desc="sft", unit="step", disable=not progress)
    for step in bar:
        optimizer.zero_grad()
        group = [example(order[(step * grad_accum + k) % len(order)]) for k in range(grad_accum)]
        loss = shared_prefix_loss(model, group, shared_prefix_length(group, turn_start))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.item())
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if log_fn is not None:
            log_fn({"step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0]})
        if out is not None and save_steps and ((step + 1) % save_steps == 0 or step + 1 == total_steps):
            _save_state(out / f"checkpoint-{step + 1}", model, processor, optimizer, scheduler, step + 1, loss_value)
    model.eval()
    return SFTResult(
        steps=total_steps, final_loss=loss_value, seconds=time.perf_counter() - t0, checkpoint=str(out) if out else None
    )


def _save_state(folder: Path, model, processor, optimizer, scheduler, step: int, loss: float) -> None:
    from medgym.rl.policy_model import save

    save(model, processor, folder)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "loss": loss,
        },
        folder / "trainer_state.pt",
    )
    (folder / "step.json").write_text(json.dumps({"step": step}))


def _latest_state(out: Path) -> Path | None:
    states = sorted(out.glob("checkpoint-*/trainer_state.pt"), key=lambda p: int(p.parent.name.split("-")[1]))
    return states[-1] if states else None


__all__ = [
    "SFTResult",
    "assistant_mask",
    "direct_conversation",
    "encode_conversation",
    "expert_conversation",
    "shared_prefix_length",
    "shared_prefix_loss",
    "train_sft",
]
