"""SFT cold start: expert episodes as multi-turn, multimodal tool conversations.

A case becomes its expert conversation (:func:`medgym.rl.conversation.expert_conversation`:
the expert's calls run through the GRPO bridge, tool turns carry the real pictures and text),
or, for the no-tools baseline, the question answered straight away (:func:`direct_conversation`).

Training is :class:`SharedPrefixSFTTrainer`, a ``transformers.Trainer`` whose only own part is
the loss; schedule, optimizer, gradient accumulation, logging, checkpoints and resume are the
Trainer's. It is not TRL's ``SFTTrainer`` because that one tokenizes the dataset itself and
patches a fused LM head into the model's forward, and both get in the way here:

- assistant-only loss on a VLM conversation needs the assistant mask *after* image-token
  expansion; TRL 1.16 computes it before expansion without re-aligning (see
  ``trl.chat_template_utils.is_chat_template_stop_token_trained``), so with tool images in the
  middle of a conversation the mask would be shifted. Here it is found on the final token ids:
  every span from the template's assistant header (Qwen's ``<|im_start|>assistant\\n``, Gemma's
  ``<start_of_turn>model\\n``, SmolVLM's ``Assistant:``; :func:`turn_markers` reads them off the
  chat template) to its end-of-turn token (inclusive, so the model learns to stop);
- the shared-prefix loss (:func:`shared_prefix_loss`) runs the language model on the common
  system text and tool list once per group and reuses its KV cache for every conversation,
  which needs the model's plain forward. It applies to multimodal-RoPE models (the Qwen-VL
  family: ``mm_token_type_ids`` and ``get_rope_index``); any other VLM trains on the plain full
  forward of each conversation.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import Trainer

from medgym.agents.prefix_cache import cache_keyword, has_multimodal_rope, kv_cache, prefix_kv
from medgym.environments.case import Case
from medgym.environments.contract import DEFAULT_TOOL_MODE, tool_schemas
from medgym.rl.bridge import MedGymToolEnv
from medgym.rl.conversation import counterfactual_answer, expert_conversation, multimodal_prompt

if TYPE_CHECKING:
    from medgym.rl.config import SFTConfig

log = logging.getLogger(__name__)


ERR_TURNS = (
    "found {found} assistant turns in the encoded conversation but it has {expected}: the chat template's "
    "assistant header {header!r} does not tokenize the same inside the conversation; give the template an "
    "assistant header that starts with a special token"
)


@dataclass(frozen=True)
class TurnMarkers:
    """Token ids that open an assistant turn (the template's generation prompt) and the token that closes it."""

    header: tuple[int, ...]
    end: int


def turn_markers(processor) -> TurnMarkers:
    """The assistant header and end-of-turn token of a processor's chat template, read off two probe renders.

    The header is what ``add_generation_prompt`` appends; the end is the first token the template
    writes after an assistant message's text (Qwen: ``<|im_start|>assistant\\n`` ... ``<|im_end|>``).
    """
    user = [{"role": "user", "content": [{"type": "text", "text": "PROBE"}]}]
    reply = [*user, {"role": "assistant", "content": [{"type": "text", "text": "REPLY"}]}]
    bare = processor.apply_chat_template(user, tokenize=False)
    prompted = processor.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    answered = processor.apply_chat_template(reply, tokenize=False)
    if not prompted.startswith(bare) or len(prompted) == len(bare) or "REPLY" not in answered:
        raise ValueError("the chat template has no generation prompt to mark assistant turns with")
    tokenizer = getattr(processor, "tokenizer", processor)
    header = tokenizer.encode(prompted[len(bare) :], add_special_tokens=False)
    end = tokenizer.encode(answered[answered.rindex("REPLY") + len("REPLY") :], add_special_tokens=False)
    if not end:
        raise ValueError("the chat template writes nothing after an assistant message: no end-of-turn token")
    return TurnMarkers(tuple(header), end[0])


def assistant_mask(input_ids: list[int], markers: TurnMarkers) -> list[int]:
    """1 on assistant-generated tokens (content, tool calls and the closing end-of-turn token), else 0."""
    header = list(markers.header)
    mask = [0] * len(input_ids)
    i = 0
    while i < len(input_ids):
        if input_ids[i : i + len(header)] == header:
            j = i + len(header)
            while j < len(input_ids) and input_ids[j] != markers.end:
                mask[j] = 1
                j += 1
            if j < len(input_ids):
                mask[j] = 1
            i = j
        i += 1
    return mask


def encode_conversation(
    processor, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, markers: TurnMarkers | None = None
) -> dict[str, Any]:
    """Model inputs (batch of one: ids, pixels and the architecture's image fields) and labels (-100 outside assistant turns).

    ``markers`` default to :func:`turn_markers` of the processor.
    """
    markers = markers or turn_markers(processor)
    enc = processor.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=False
    )
    ids = enc["input_ids"]
    flags = assistant_mask(ids[0].tolist(), markers)
    found = sum(1 for a, b in zip([0, *flags], flags, strict=False) if b and not a)
    expected = sum(1 for m in messages if m["role"] == "assistant")
    if found != expected:
        header = processor.tokenizer.decode(list(markers.header))
        raise ValueError(ERR_TURNS.format(found=found, expected=expected, header=header))
    mask = torch.tensor([flags], dtype=torch.bool)
    out = {k: v for k, v in enc.items() if k != "attention_mask"}
    out["labels"] = torch.where(mask, ids, torch.full_like(ids, -100))
    return out


def direct_conversation(case: Case, tool_mode: str = DEFAULT_TOOL_MODE) -> list[dict[str, Any]]:
    """The no-tools baseline's conversation: the question, then the expert's answer straight away."""
    answer = {"role": "assistant", "content": [{"type": "text", "text": case.expert_answer}]}
    return [*multimodal_prompt(case, tool_mode), answer]


def shared_prefix_length(examples: list[dict[str, Any]], turn_start: int) -> int:
    """Length of the token prefix all examples share, cut back to a turn start (0 if none).

    Every conversation opens with the same system text and tool list (about 730 of ~1000
    tokens), so :func:`shared_prefix_loss` runs it once per group instead of once per example.
    Examples without ``mm_token_type_ids`` (VLMs outside the Qwen-VL family) share nothing.
    """
    if any("mm_token_type_ids" not in ex for ex in examples):
        return 0
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


def answer_weights(labels: torch.Tensor, answer_weight: float) -> torch.Tensor:
    """Per-token loss weights: ``answer_weight`` on the last assistant turn (the answer), 1 on other labels, 0 elsewhere.

    >>> answer_weights(torch.tensor([[-100, 5, 6, -100, -100, 7, 8]]), 4.0).tolist()
    [[0.0, 1.0, 1.0, 0.0, 0.0, 4.0, 4.0]]
    """
    labelled = labels != -100
    weights = labelled.to(torch.float32)
    for row in range(labels.shape[0]):
        where = labelled[row].nonzero().flatten()
        if not len(where):
            continue
        gaps = (where[1:] - where[:-1] > 1).nonzero().flatten()
        start = int(where[int(gaps[-1]) + 1]) if len(gaps) else int(where[0])
        weights[row, start:] = weights[row, start:] * answer_weight
    return weights


def weighted_token_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged with ``weights`` (of the labels' positions); plain mean when all are 1."""
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="none"
    )
    w = weights[:, 1:].flatten()
    return (ce * w).sum() / w.sum().clamp(min=1e-8)


def _example_loss(model, answer_weight: float, **inputs: Any) -> torch.Tensor:
    """One example's loss: the model's own when every label weighs the same, else :func:`weighted_token_loss`."""
    if answer_weight == 1.0:
        return model(**inputs).loss
    labels = inputs.pop("labels")
    logits = model(**inputs).logits
    return weighted_token_loss(logits, labels, answer_weights(labels, answer_weight))


def shared_prefix_loss(model, examples: list[dict[str, Any]], prefix: int, answer_weight: float = 1.0) -> torch.Tensor:
    """Mean next-token loss of the examples, running their common ``prefix`` tokens once.

    The prefix's keys and values are computed once (with gradient) and reused by each example's
    suffix; the suffix gets its multimodal RoPE positions from the whole sequence, so the loss
    equals the full forward's (``tests/rl/test_sft.py`` checks losses and gradients).
    ``answer_weight`` > 1 weighs the answer turn's tokens that much more than the calls' (the answer
    is a few tokens of a conversation's labels; copying a number from a tool result into it is
    learnt from those few alone).
    """
    if prefix == 0:
        return sum(_example_loss(model, answer_weight, **ex) for ex in examples) / len(examples)
    keyword = cache_keyword(model)
    kv = prefix_kv(model, examples[0]["input_ids"][0, :prefix])
    total = torch.zeros((), device=kv[0][0].device)
    for ex in examples:
        positions, _ = model.model.get_rope_index(
            ex["input_ids"], ex["mm_token_type_ids"], image_grid_thw=ex.get("image_grid_thw")
        )
        cache = kv_cache(model, kv)
        suffix = {k: ex[k][:, prefix:] for k in ("input_ids", "mm_token_type_ids", "labels")}
        images = {k: ex[k] for k in ("pixel_values", "image_grid_thw") if k in ex}
        loss = _example_loss(
            model,
            answer_weight,
            **suffix,
            **images,
            position_ids=positions[:, :, prefix:],
            use_cache=True,
            **{keyword: cache},
        )
        total = total + loss
    return total / len(examples)


class ConversationDataset(torch.utils.data.Dataset):
    """Cases as encoded conversations (one per item), built when drawn.

    ``cases`` may be a lazy sequence of thousands (:class:`medgym.environments.sources.CaseRange`):
    pictures and tool results are made only for the cases drawn; the last 64 are kept, so small
    case lists (tests, demos) are encoded once. With ``keep``, every built conversation is kept
    (pictures at the policy's size: ~0.2 MB each), so later epochs skip the tools; with
    ``counterfactual`` as well, each draw of a conversation swaps a freshly drawn number, so every
    epoch brings new copying examples. ``tools``: the schemas the conversations are rendered with
    (default: the contract's).
    """

    def __init__(
        self,
        cases: Sequence[Case],
        processor,
        with_tools: bool = True,
        tool_mode: str = DEFAULT_TOOL_MODE,
        segmenter: str = "threshold",
        turns: int = 0,
        candidate_iou: float | None = None,
        counterfactual: float = 0.0,
        tools: list[dict[str, Any]] | None = None,
        keep: bool = False,
    ):
        self.cases = cases
        self.turns = turns
        self.candidate_iou = candidate_iou
        self.counterfactual = counterfactual
        self.processor = processor
        self.with_tools = with_tools
        self.tool_mode = tool_mode
        self.tools = (tools if tools is not None else tool_schemas()) if with_tools else None
        self.env = MedGymToolEnv(segmenter=segmenter, tool_mode=tool_mode)
        self.markers = turn_markers(processor)
        self.kept: dict[int, list[dict[str, Any]]] | None = {} if keep else None
        self.draws: collections.Counter[int] = collections.Counter()
        self.encoded = functools.lru_cache(maxsize=64)(self._encode)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.kept is not None and self.counterfactual:
            self.draws[index] += 1  # a fresh swap per draw: encoded anew, from the kept conversation
            return self._encode(index, self.draws[index])
        return self.encoded(index)

    def _messages(self, index: int) -> list[dict[str, Any]]:
        if self.kept is not None and index in self.kept:
            return self.kept[index]
        case = self.cases[index]
        if self.with_tools:
            messages = expert_conversation(
                case, self.env, self.tool_mode, turns=self.turns, candidate_iou=self.candidate_iou
            )[0]
        else:
            messages = direct_conversation(case, self.tool_mode)
        if self.kept is not None:
            self.kept[index] = messages
        return messages

    def _encode(self, index: int, draw: int = 0) -> dict[str, Any]:
        messages = self._messages(index)
        if self.with_tools and self.counterfactual:
            rng = np.random.default_rng([int(self.cases[index].seed or 0), index, 104729, draw])
            if rng.random() < self.counterfactual:
                messages = counterfactual_answer(messages, rng) or messages
        return encode_conversation(self.processor, messages, self.tools, self.markers)


def group_collator(conversations: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """A batch is a *group* of conversations, kept as a list rather than padded into one tensor.

    The shared-prefix loss needs each conversation whole (its own images, grids and RoPE
    positions) and the group together (to run their common prefix once), so the collator does
    not pad; ``per_device_train_batch_size`` is the group size.
    """
    return {"conversations": conversations}


class SharedPrefixSFTTrainer(Trainer):
    """``transformers.Trainer`` whose loss runs a group's common system text and tool list once.

    One process only: :func:`shared_prefix_loss` calls the model several times per step (the
    prefix, then each suffix), and DistributedDataParallel syncs gradients for one forward per
    backward. Models without multimodal RoPE (:func:`has_multimodal_rope`: SmolVLM, Gemma 3) take
    the plain full forward of each conversation.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("data_collator", group_collator)
        super().__init__(*args, **kwargs)
        if self.args.world_size > 1:
            raise ValueError(
                "SFT runs in one process: the shared-prefix loss makes several forwards per step, which "
                "DistributedDataParallel cannot sync; run `medgym train sft` without `accelerate launch`"
            )
        # The assistant header opens with the template's turn start (Qwen: <|im_start|>); models without
        # multimodal RoPE train on the plain full forward (prefix 0).
        self.turn_start = turn_markers(self.processing_class).header[0]
        self.shares_prefix = has_multimodal_rope(self.model)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        group = inputs["conversations"]
        prefix = shared_prefix_length(group, self.turn_start) if self.shares_prefix else 0
        loss = shared_prefix_loss(model, group, prefix, self.args.answer_weight)
        return (loss, None) if return_outputs else loss


def train_sft(
    model,
    processor,
    cases: Sequence[Case],
    args: SFTConfig,
    callbacks: list | None = None,
    resume_from_checkpoint: str | None = None,
) -> SharedPrefixSFTTrainer:
    """Next-token loss on the assistant tokens of the cases' conversations; the trainer after training.

    With ``args.tools``, a case becomes its expert conversation (tool calls and real tool results);
    without (the no-tools baseline) the question is answered directly.
    """
    dataset = ConversationDataset(
        cases,
        processor,
        args.tools,
        args.tool_mode,
        args.segmenter,
        args.turns,
        candidate_iou=args.expert_candidate_iou,
        counterfactual=args.counterfactual_answers,
        tools=tool_schemas(brief=args.brief_tools),
        keep=args.keep_conversations,
    )
    trainer = SharedPrefixSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor, callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    model.eval()
    return trainer


__all__ = [
    "ConversationDataset",
    "SharedPrefixSFTTrainer",
    "TurnMarkers",
    "answer_weights",
    "assistant_mask",
    "direct_conversation",
    "encode_conversation",
    "group_collator",
    "has_multimodal_rope",
    "shared_prefix_length",
    "shared_prefix_loss",
    "train_sft",
    "turn_markers",
    "weighted_token_loss",
]
