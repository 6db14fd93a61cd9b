"""GRPO on medgym cases with TRL's ``GRPOTrainer(environment_factory=...)``.

Each dataset row is a case (``case_seed``, ``source``), its prompt (system + user text, the
question pictures in ``images``) and the reward columns of :meth:`Case.reward_columns`.
One :class:`~medgym.rl.bridge.MedGymToolEnv` per rollout runs the real medgym tools.
Rewards are the functions of :mod:`medgym.environments.rewards`, weighted as the env weighs
them; the tool-use bonus gets ``tool_calls_ok`` from the bridge, counting only calls whose
results the model actually saw (TRL drops a tool result that would overflow
``max_completion_length``; such a call earns nothing).

:class:`MedGymGRPOTrainer` fixes TRL 1.16 bugs, times rollouts, decodes under a grammar and
shares the prompt prefix by overriding private methods of ``GRPOTrainer``: ``_tokenize_prompts``
(image fields as tensors), ``_get_train_sampler`` (epoch-seeded order), ``_generate`` (timing),
``_generate_single_turn`` (constrained decoding, the prompt prefix run once; only the multimodal fields ``generate`` takes,
Gemma 3's ``num_crops`` and Idefics3's token types dropped), ``__init__`` (the model's own image
token marks tool-image token types: Gemma 3's ``<image_soft_token>``), ``_generate_and_score_completions``
(Idefics3's tool-image pixels grouped by rollout) and ``_get_per_token_logps_and_entropies``
(shared-prefix log-probs); that is why ``pyproject.toml`` pins ``trl`` to the minor version tested.
Everything else is TRL's own trainer.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler

from medgym.agents.backends import embedded_turn_limits
from medgym.agents.prefix_cache import cache_keyword, has_multimodal_rope, kv_cache, output_kv, prefix_kv
from medgym.environments.case import Case
from medgym.environments.contract import DEFAULT_TOOL_MODE
from medgym.environments.rewards import REWARD_FUNCS, REWARD_WEIGHTS
from medgym.rl.bridge import MedGymToolEnv, ok_calls_among_first, stage_source
from medgym.rl.conversation import prompt_messages

if TYPE_CHECKING:
    from medgym.rl.config import GRPOConfig

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` whose order depends on the seed and the epoch only.

    TRL's draws every epoch's order from one generator, so a run resumed at or after an epoch
    boundary (a fresh generator) replays epoch 0's order instead of the one the interrupted run
    would have seen. The Trainer calls ``set_epoch`` at each epoch start, also when resuming.
    """

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + epoch)


class MedGymGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with image fields as tensors under ``environment_factory`` and an epoch-seeded sampler.

    TRL 1.16's ``_tokenize_prompts`` renders prompts one by one when an
    ``environment_factory`` is set and merges the processor's outputs; as the processor is
    called without ``return_tensors``, ``pixel_values`` and ``image_grid_thw`` come back as
    Python lists. When a tool round yields no picture, ``_tool_call_loop`` passes those
    fields to ``split_pixel_values_by_grid``, which calls ``image_grid_thw.prod(-1)`` and
    crashes with ``'list' object has no attribute 'prod'``. Converting the image fields to
    tensors here is what the non-environment path already returns.
    """

    def __init__(self, *args, tools: list[dict[str, Any]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._turns_generated = 0  # rollout turns generated in the current _generate call
        self._warned_cut = False  # rollouts/cut_by_budget warned of once a run
        self._prompt_tools = tools
        if tools is not None:
            # TRL renders the tool list from the env's methods wherever it renders a prompt (the rollout's and
            # the log-prob pass's); a checkpoint trained on other schemas (brief ones) reads its own there.
            self.processing_class.apply_chat_template = _with_tool_list(
                self.processing_class.apply_chat_template, tools
            )
        # TRL finds image placeholders by ``<|image_pad|>`` / ``<|image|>`` only; Gemma 3's is
        # ``<image_soft_token>``. The model's own id marks tool-image tokens (token type 1).
        image_id = getattr(self.model.config, "image_token_id", None)
        if self._is_vlm and image_id is not None:
            self._image_pad_token_id = image_id

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, fields = super()._tokenize_prompts(prompts)
        for key in IMAGE_FIELDS:
            value = fields.get(key)
            if isinstance(value, list) and value:
                fields[key] = torch.as_tensor(np.asarray(value))
        return prompt_ids, images, fields

    def _get_train_sampler(self, dataset=None):
        """TRL's sampler, with each epoch's order from its own seed (see :class:`EpochSeededRepeatSampler`)."""
        trl_sampler = super()._get_train_sampler(dataset)
        return EpochSeededRepeatSampler(
            data_source=trl_sampler.data_source,
            mini_repeat_count=trl_sampler.mini_repeat_count,
            batch_size=trl_sampler.batch_size,
            repeat_count=trl_sampler.repeat_count,
            shuffle=trl_sampler.shuffle,
            seed=trl_sampler.seed,
        )

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's turn generation; with ``constrained``, every turn is decoded under the turn grammar (the turn after
        the last tool round: an answer only, as a held-out episode's last turn), and with
        ``shared_prefix`` the rows' common system text and tool list are run once (:func:`prefix_cached_generate`).

        The grammar (:mod:`medgym.agents.constrained`) admits only tool calls that match the tools'
        schemas or an answer in the env's format, and ends the turn where the grammar is complete,
        so no rollout wastes its token budget on text that cannot parse. TRL's own ``generate`` call
        gets the logits processor and the prefix cache through the unwrapped model for the length of this turn.

        Either way, ``generate`` gets only the multimodal fields the model takes (TRL passes Gemma 3's
        ``num_crops``, which ``generate`` rejects), and TRL builds tool-image token types only under
        the key the model takes (``mm_token_type_ids`` with ``image_grid_thw``, else ``token_type_ids``,
        which Idefics3 rejects).
        """
        inner = self.accelerator.unwrap_model(self.model)
        accepted = generate_kwargs(inner)
        multimodal_fields = {k: v for k, v in multimodal_fields.items() if k in accepted}
        typed = "mm_token_type_ids" if "image_grid_thw" in multimodal_fields else "token_type_ids"
        has_tool_images = has_tool_images and typed in accepted
        if self.use_vllm:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        self._turns_generated += 1
        extra: dict[str, Any] = {}
        if getattr(self.args, "constrained", False):
            from transformers import LogitsProcessorList

            from medgym.agents.constrained import constrained_logits_processor, stop_ids

            budget = int(self.generation_config.max_new_tokens or self.max_completion_length)
            # TRL runs no tool after the last round's turn: there, as in a held-out episode's last turn, only an answer
            last = self._turns_generated > (self.max_tool_calling_iterations or 0)
            grammar = constrained_logits_processor(
                self._tokenizer,
                None if last else self.tools_schemas,
                limits=ROLLOUT_LIMITS,
                max_new_tokens=budget,
                stop_token_ids=stop_ids(self._tokenizer, self.generation_config),
            )
            extra["logits_processor"] = LogitsProcessorList([grammar])
        generate = functools.partial(type(inner).generate, inner, **extra)
        if getattr(self.args, "shared_prefix", False) and has_multimodal_rope(inner):
            turn_start = self._tokenizer.convert_tokens_to_ids("<|im_start|>")
            generate = functools.partial(prefix_cached_generate, generate, inner, turn_start)
        inner.generate = generate
        try:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        finally:
            del inner.generate

    def _generate_and_score_completions(self, inputs):
        """TRL's rollouts and scores, with Idefics3's pictures grouped by rollout after a tool image, and
        the loss cut to the answer turn under ``loss_on: answer`` (:func:`answer_turn_mask`) and the
        advantages clamped from below under ``advantage_floor``.

        After a tool image TRL runs the image processor on all pictures as one flat list; Idefics3's
        returns ``pixel_values`` (1, n_images, ...), which TRL's shuffle indexes by rollout. Regrouped
        to (rollouts, most images, ...), zero-padded as Idefics3's processor pads a batch.
        """
        evidence = getattr(self.args, "answer_evidence", "rollout")
        if evidence == "expert":
            inputs = self._expert_evidence(inputs)
        elif evidence == "policy":
            inputs = self._policy_evidence(inputs)
        out = super()._generate_and_score_completions(inputs)
        types, image_id = out.get("mm_token_type_ids"), getattr(self.model.config, "image_token_id", None)
        if types is not None and image_id is not None:
            # TRL re-renders prompts with its own chat-template helper for the image fields; a prompt holding
            # earlier assistant calls (answer_evidence: expert or policy) renders a few tokens apart from the ids
            # generated from, shifting the token types against the ids (at the same width or not), and the
            # multimodal RoPE then places the pictures wrongly: the loss pass scored other log-probs than the
            # policy's. The types are rebuilt from the ids themselves (as TRL does after a tool image).
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
            out["mm_token_type_ids"] = (ids == image_id).to(types.dtype)
        if getattr(self.args, "loss_on", "all") == "answer" and out.get("tool_mask") is not None:
            from medgym.agents.constrained import ANSWER_OPEN

            opens = self._tokenizer.encode(ANSWER_OPEN, add_special_tokens=False)
            out["tool_mask"] = answer_turn_mask(
                out["tool_mask"], out["completion_mask"], out["completion_ids"], opens[0] if len(opens) == 1 else None
            )
        floor = getattr(self.args, "advantage_floor", None)
        if floor is not None:
            out["advantages"] = out["advantages"].clamp(min=floor)
        pixels, counts = out.get("pixel_values"), out.get("num_images")
        if pixels is not None and pixels.ndim == 5 and counts is not None and pixels.size(0) != len(counts):
            for key in ("pixel_values", "pixel_attention_mask"):
                if out.get(key) is not None:
                    out[key] = group_by_rollout(out[key].flatten(0, 1), counts)
        return out

    @functools.cached_property
    def _evidence_env(self) -> MedGymToolEnv:
        """The env the expert's calls run through under ``answer_evidence: expert`` (the rollouts' segmenter and mode)."""
        return MedGymToolEnv(segmenter=self.args.segmenter, tool_mode=self.args.tool_mode)

    def _expert_evidence(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows whose prompt is the annotator expert's episode up to its answer (``answer_evidence: expert``).

        The row's case comes from the env's own ``reset``, and the expert's calls run through that env,
        so the results (text and pictures) are what the real tools return.
        """
        from medgym.rl.conversation import evidence_prompt

        env = self._evidence_env
        return self._evidence_rows(inputs, lambda row: (evidence_prompt(env.case, env), env.ctx))

    def _evidence_rows(self, inputs: list[dict[str, Any]], prompt_for) -> list[dict[str, Any]]:
        """``inputs`` with each row's prompt from ``prompt_for(row)``, called once per case right after the
        evidence env's ``reset`` to it (the rows repeated for a group share one build); the ``images`` column
        goes, the question pictures sitting in the prompt's messages. ``prompt_for`` returns the prompt and the
        tool context its calls left (masks, detect's candidates), which the row carries as ``tool_context``:
        a rollout that calls a tool before it answers (``max_tool_calling_iterations`` > 0) continues from a
        copy of it (``MedGymToolEnv.reset``); no env touches it again, its next reset starting a new one."""
        env = self._evidence_env
        built: dict[tuple[Any, ...], tuple[list[dict[str, Any]], Any]] = {}
        rows = []
        for row in inputs:
            key = (row.get("source"), tuple(row.get("stages") or ()), int(row["case_seed"]))
            if key not in built:
                env.reset(**row)
                built[key] = prompt_for(row)
            prompt, context = built[key]
            kept = {k: v for k, v in row.items() if k != "images"}
            rows.append({**kept, "prompt": prompt, "tool_context": context})
        return rows

    @functools.cached_property
    def _episode_env(self):
        """The env the live policy's own episodes run in under ``answer_evidence: policy`` (as the held-out curve's)."""
        import gymnasium as gym

        from medgym.environments.evaluate import ENV_ID

        return gym.make(ENV_ID, source=self.args.source, tool_mode=self.args.tool_mode, segmenter=self.args.segmenter)

    def _policy_evidence(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows whose prompt is the live policy's own greedy episode up to its answer (``answer_evidence: policy``).

        The weights are saved and loaded as a checkpoint (the curve's path, so the episode is exactly what
        ``medgym eval`` would run: the recorded system text and tool list, constrained turns as configured);
        its calls run through the real tools and the prompt is the conversation its answer turn read. Where
        the episode ends without an answer the expert's evidence stands in. Logs ``evidence/policy_share``
        and ``evidence/policy_correct`` (the greedy episodes' accuracy on these training cases).
        """
        from medgym.environments.evaluate import run_episode
        from medgym.rl.conversation import evidence_prompt
        from medgym.rl.curve import live_backend

        env = self._evidence_env
        own, right = [], []
        inner = self.accelerator.unwrap_model(self.model)
        constrained = bool(getattr(self.args, "constrained", False))
        meta = {"model_id": "grpo-live"}
        with live_backend(
            inner, self.processing_class, meta, self.args.tool_mode, constrained, self._prompt_tools
        ) as policy:

            def own_episode(row: dict[str, Any]) -> list[dict[str, Any]]:
                ep = run_episode(self._episode_env, policy, int(row["case_seed"]), case=env.case)
                final = ep["messages"][-1]
                answered = ep["terminated"] and final["role"] == "assistant" and "<answer>" in final["content"]
                own.append(answered)
                right.append(bool(ep["info"].get("correct")))
                if answered:
                    return policy.conversation(ep["messages"][:-1]), self._episode_env.unwrapped.ctx
                return evidence_prompt(env.case, env), env.ctx

            rows = self._evidence_rows(inputs, own_episode)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["evidence/policy_share"].append(float(np.mean(own)))
        self._metrics[mode]["evidence/policy_correct"].append(float(np.mean(right)))
        return rows

    @functools.cached_property
    def tools_schemas(self) -> list[dict[str, Any]]:
        """The tool list the rollouts' prompts carry: the checkpoint's own, else the contract's (the bridge's methods)."""
        from medgym.environments.contract import tool_schemas

        return self._prompt_tools if self._prompt_tools is not None else tool_schemas()

    def _generate(self, prompts: list):
        """TRL's rollout, timed: logs ``timing/rollout_seconds``, ``timing/tool_seconds``, their ratio,
        ``tools/failed_share`` (calls whose tool rejected them; TRL's ``tools/failure_frequency`` counts only
        calls that raised, and medgym's tools answer bad arguments with an error text instead) and
        ``rollouts/cut_by_budget`` (:func:`cut_by_budget`; warned of once a run above :data:`CUT_WARNING`)."""
        tool_before = _tool_seconds(self.environments)
        self._turns_generated = 0  # the first turn, then one per tool round (see _generate_single_turn)
        t0 = time.perf_counter()
        out = super()._generate(prompts)
        rollout = time.perf_counter() - t0
        tools = _tool_seconds(self.environments) - tool_before
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["timing/rollout_seconds"].append(rollout)
        self._metrics[mode]["timing/tool_seconds"].append(tools)
        self._metrics[mode]["timing/tool_share"].append(tools / rollout if rollout > 0 else 0.0)
        calls = [c for env in self.environments or [] for c in env.calls]
        if calls:  # watched by the drift guard (failure_ceiling)
            self._metrics[mode]["tools/failed_share"].append(sum(not c.ok for c in calls) / len(calls))
        completions = out[3]
        rounds = self.max_tool_calling_iterations
        cut = float(np.mean([cut_by_budget(c, rounds) for c in completions])) if completions else 0.0
        self._metrics[mode]["rollouts/cut_by_budget"].append(cut)
        if cut > CUT_WARNING and not self._warned_cut:
            self._warned_cut = True
            log.warning(ERR_CUT.format(share=cut, budget=self.max_completion_length))
        return out

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's log-prob pass, with the rollouts' common system text and tool list run once (``shared_prefix``).

        Falls back to TRL's batched forward for models without multimodal RoPE (``get_rope_index``),
        MoE aux losses, or batches whose rows share no image-free prefix.
        """
        fields = dict(zip(("batch_size", "compute_entropy", "compute_aux_loss"), args, strict=False)) | kwargs
        inner = self.accelerator.unwrap_model(model)
        usable = (
            getattr(self.args, "shared_prefix", False)
            and not fields.get("compute_aux_loss")
            and fields.get("mm_token_type_ids") is not None
            and has_multimodal_rope(inner)
            and not any(fields.get(k) is not None for k in SHARED_PREFIX_UNSUPPORTED)
            and (fields.get("pixel_values") is None or fields.get("num_images") is not None)
        )
        if usable and fields.get("pixel_values") is not None:
            groups = prompt_groups(input_ids, attention_mask, fields["mm_token_type_ids"], logits_to_keep)
            if groups is not None:  # whole prompts, pictures included, repeat across rows: each runs once
                with self.accelerator.autocast():
                    return group_prompt_logps(
                        model,
                        inner,
                        input_ids,
                        attention_mask,
                        fields["mm_token_type_ids"],
                        groups,
                        logits_to_keep,
                        fields["pixel_values"],
                        fields.get("image_grid_thw"),
                        fields["num_images"],
                        bool(fields.get("compute_entropy")),
                    )
        if usable:
            turn_start = self._tokenizer.convert_tokens_to_ids("<|im_start|>")
            rows = rollout_rows(input_ids, attention_mask, fields["mm_token_type_ids"])
            prefix = common_prefix(rows, turn_start)
            if prefix >= MIN_SHARED_PREFIX:
                with self.accelerator.autocast():
                    return shared_prefix_logps(
                        model,
                        inner,
                        input_ids,
                        attention_mask,
                        fields["mm_token_type_ids"],
                        rows,
                        prefix,
                        logits_to_keep,
                        fields.get("pixel_values"),
                        fields.get("image_grid_thw"),
                        fields.get("num_images"),
                        bool(fields.get("compute_entropy")),
                        fields.get("batch_size"),
                    )
        return super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
        )


# What a rollout turn may hold under ``constrained``: the embedded backend's limits (no thoughts, one call, as
# the SFT turns; answers and strings within its 128-token turn: 64 characters, a little longer than the
# expert's), so a rollout is written under the grammar its evaluation reads. Sampled at temperature 1, a policy
# that may write 200-character strings fills them with loops ("agagag...") that cost tokens and teach nothing.
ROLLOUT_LIMITS = embedded_turn_limits()

# Multimodal fields of other architectures (tiles, patches, Gemma's token types): TRL's own pass handles them.
SHARED_PREFIX_UNSUPPORTED = (
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "image_position_ids",
)
MIN_SHARED_PREFIX = 32


def _with_tool_list(render, tools: list[dict[str, Any]]):
    """``render`` (an ``apply_chat_template``) with any tool list given to it replaced by ``tools``."""

    @functools.wraps(render)
    def rendered(*args: Any, **kwargs: Any):
        if kwargs.get("tools"):
            kwargs["tools"] = tools
        return render(*args, **kwargs)

    return rendered


def generate_kwargs(model) -> set[str]:
    """The keyword arguments ``model.generate`` accepts (its own check: ``_validate_model_kwargs``)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the wrapped model's
    accepted = set(inspect.signature(base.prepare_inputs_for_generation).parameters)
    if accepted & {"kwargs", "model_kwargs"}:
        accepted |= set(inspect.signature(base.forward).parameters)
    return accepted


def answer_turn_mask(
    tool_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    completion_ids: torch.Tensor | None = None,
    answer_open: int | None = None,
) -> torch.Tensor:
    """TRL's ``tool_mask`` (1: a token the model wrote, 0: a tool result) cut to the answer: every token up
    to a row's last tool-result token becomes 0 and, when ``<answer>`` is one token (``answer_open``), every
    token up to and including the row's last ``<answer>`` too (a row without one trains nothing). So the
    choice between answering and calling a tool gets no gradient, only what the answer says.

    >>> mask, ones = torch.tensor([[1, 1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]), torch.ones(2, 7)
    >>> answer_turn_mask(mask, ones).tolist()
    [[0, 0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]
    >>> ids = torch.tensor([[5, 6, 8, 8, 9, 3, 4], [5, 6, 9, 3, 4, 2, 2]])  # 9: <answer>
    >>> answer_turn_mask(mask, ones, ids, answer_open=9).tolist()
    [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1]]
    """
    positions = torch.arange(tool_mask.size(1), device=tool_mask.device).expand_as(tool_mask)
    none = torch.full_like(positions, -1)
    cut = torch.where((tool_mask == 0) & (completion_mask > 0), positions, none).amax(dim=1, keepdim=True)
    if completion_ids is not None and answer_open is not None:
        opened = torch.where((completion_ids == answer_open) & (completion_mask > 0), positions, none)
        last_open = opened.amax(dim=1, keepdim=True)
        cut = torch.where(last_open >= 0, torch.maximum(cut, last_open), torch.full_like(cut, tool_mask.size(1)))
    return tool_mask * (positions > cut).to(tool_mask.dtype)


def group_by_rollout(flat: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-picture rows (n_images, ...) as (rollouts, most images, ...), each rollout's zero-padded."""
    grouped = flat.new_zeros((len(counts), max(counts, default=0), *flat.shape[1:]))
    start = 0
    for row, n in enumerate(counts):
        grouped[row, :n] = flat[start : start + n]
        start += n
    return grouped


def rollout_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, mm_token_type_ids: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Each rollout without its left padding: (token ids, multimodal token types, start column)."""
    out = []
    for r in range(input_ids.size(0)):
        nonzero = attention_mask[r].nonzero()
        start = int(nonzero[0]) if len(nonzero) else 0
        out.append((input_ids[r, start:], mm_token_type_ids[r, start:], start))
    return out


def common_prefix(rows: list[tuple[torch.Tensor, torch.Tensor, int]], turn_start: int) -> int:
    """Length of the image-free token prefix every row shares, cut back to a turn start (0 if none)."""
    first = rows[0][0]
    n = min(len(ids) for ids, _, _ in rows)
    for ids, _, _ in rows[1:]:
        diff = (ids[:n] != first[:n]).nonzero()
        if len(diff):
            n = int(diff[0])
    for _, mm, _ in rows:
        media = mm[:n].nonzero()
        if len(media):
            n = int(media[0])
    starts = (first[:n] == turn_start).nonzero()
    return int(starts[-1]) if len(starts) else 0


def prefix_first(rows: list[tuple[torch.Tensor, torch.Tensor, int]], prefix: int, width: int) -> torch.Tensor:
    """Column order per row that moves the shared prefix before the left padding: prefix, padding, the rest."""
    columns = torch.arange(width)
    order = []
    for _, _, start in rows:
        order.append(torch.cat([columns[start : start + prefix], columns[:start], columns[start + prefix :]]))
    return torch.stack(order)


def prefix_cached_generate(generate, inner, turn_start: int, input_ids, attention_mask, **kwargs):
    """``generate`` with the rows' shared image-free prefix (system text, tool list) run once, not once per row.

    The left-padded rows are rearranged to prefix, padding, rest (the attention mask keeps the padding out,
    and positions, multimodal RoPE included, count only unmasked tokens, so each row's tokens keep their
    positions); the prefix's keys and values are computed for one row and copied into the cache of all.
    The rows keep their width, so the caller's slice of the completion after the prompt is unchanged.
    Falls back to plain ``generate`` when the rows share less than ``MIN_SHARED_PREFIX`` tokens.
    """
    types = kwargs.get("mm_token_type_ids")
    rows = rollout_rows(input_ids, attention_mask, types if types is not None else torch.zeros_like(input_ids))
    prefix = common_prefix(rows, turn_start)
    if prefix < MIN_SHARED_PREFIX:
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    order = prefix_first(rows, prefix, input_ids.size(1)).to(input_ids.device)
    if types is not None:
        kwargs["mm_token_type_ids"] = types.gather(1, order)
    kv = prefix_kv(inner, rows[0][0][:prefix])
    inner.model.rope_deltas = None  # positions of this batch, not of the last one's decoding
    kwargs[cache_keyword(inner)] = kv_cache(inner, kv, input_ids.size(0))
    return generate(input_ids=input_ids.gather(1, order), attention_mask=attention_mask.gather(1, order), **kwargs)


def shared_prefix_logps(
    model,
    inner,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    rows: list[tuple[torch.Tensor, torch.Tensor, int]],
    prefix: int,
    logits_to_keep: int,
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    num_images: list[int] | None,
    compute_entropy: bool,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """Per-token log-probs (and entropies) of the last ``logits_to_keep`` tokens of each row, prefix run once.

    The prefix's keys and values are computed once (with gradient when enabled) and copied into the
    cache of every row; the rows, rearranged as in :func:`prefix_cached_generate` (prefix, padding, the
    rest), run their suffixes as one batch (``batch_size`` rows at a time, as TRL's pass), with multimodal
    RoPE positions from the whole rows: the values equal TRL's batched forward (``tests/rl/test_grpo.py``
    checks log-probs and gradients). ``model`` is the trainer's (with TRL's fused log-prob head),
    ``inner`` the unwrapped model.
    """
    keyword = cache_keyword(inner)
    kv = prefix_kv(inner, rows[0][0][:prefix])
    order = prefix_first(rows, prefix, input_ids.size(1)).to(input_ids.device)
    ids, mask, types = (t.gather(1, order) for t in (input_ids, attention_mask, mm_token_type_ids))
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-logits_to_keep] = -100
    image_starts = np.cumsum([0, *(num_images or [0] * len(rows))])
    pixel_starts = None
    if image_grid_thw is not None:
        pixel_starts = np.cumsum([0, *image_grid_thw.prod(-1).tolist()])
    step = batch_size or len(rows)
    logps, entropies = [], []
    for lo in range(0, len(rows), step):
        hi = min(len(rows), lo + step)
        images: dict[str, torch.Tensor] = {}
        grid = None
        if pixel_values is not None and image_grid_thw is not None and pixel_starts is not None:
            a, b = int(image_starts[lo]), int(image_starts[hi])
            if b > a:
                grid = image_grid_thw[a:b]
                images = {
                    "pixel_values": pixel_values[int(pixel_starts[a]) : int(pixel_starts[b])],
                    "image_grid_thw": grid,
                }
        positions, _ = inner.model.get_rope_index(
            ids[lo:hi], types[lo:hi], image_grid_thw=grid, attention_mask=mask[lo:hi]
        )
        out = model(
            input_ids=ids[lo:hi, prefix:],
            mm_token_type_ids=types[lo:hi, prefix:],
            position_ids=positions[:, :, prefix:],
            attention_mask=mask[lo:hi],
            labels=labels[lo:hi, prefix:],
            fused_lm_head=True,
            **images,
            **{keyword: kv_cache(inner, kv, hi - lo)},
        )
        logps.append(out.log_probs[:, -logits_to_keep:])
        if compute_entropy:
            entropies.append(out.entropy[:, -logits_to_keep:])
    return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None


def prompt_groups(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, mm_token_type_ids: torch.Tensor, logits_to_keep: int
) -> list[tuple[list[int], int]] | None:
    """Rows that share one prompt, as (rows, prompt start column) (TRL's loss pass may hold a group's rollouts
    in any order), when at least one prompt repeats and no completion holds a picture (its rollouts called
    no tool that returned one); else None.
    """
    prompt = input_ids.size(1) - logits_to_keep
    if prompt <= 0 or mm_token_type_ids[:, prompt:].any():
        return None
    groups: dict[tuple[int, ...], tuple[list[int], int]] = {}
    for r in range(input_ids.size(0)):
        nonzero = attention_mask[r, :prompt].nonzero()
        start = int(nonzero[0]) if len(nonzero) else prompt
        groups.setdefault((start, *input_ids[r, start:prompt].tolist()), ([], start))[0].append(r)
    return list(groups.values()) if len(groups) < input_ids.size(0) else None


def group_prompt_logps(
    model,
    inner,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    groups: list[tuple[list[int], int]],
    logits_to_keep: int,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    num_images: list[int],
    compute_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """Per-token log-probs (and entropies) of each row's completion, each group's prompt run once.

    For rows sharing a prompt (see :func:`prompt_groups`), the prompt (system text, question, pictures,
    any earlier turns) but its last token runs once through the model with its first row's pictures, with
    gradient when enabled, and its keys and values are copied into the cache of every row of the group;
    the rows' last prompt token and completions then run as one batch, with multimodal RoPE positions
    from the whole rows. The left padding before a group's prompt is dropped, not computed. Equal to
    TRL's batched forward (``tests/rl/test_grpo.py``).
    """
    keyword = cache_keyword(inner)
    prompt = input_ids.size(1) - logits_to_keep
    image_starts = np.cumsum([0, *num_images])
    pixel_starts = np.cumsum([0, *image_grid_thw.prod(-1).tolist()]) if image_grid_thw is not None else None
    logps_rows, entropy_rows, order = [], [], []
    for rows, start in groups:
        ids, mask, types = (t[rows, start:] for t in (input_ids, attention_mask, mm_token_type_ids))
        spans = [(int(image_starts[r]), int(image_starts[r + 1])) for r in rows]
        grid = None
        if image_grid_thw is not None and any(b > a for a, b in spans):
            grid = torch.cat([image_grid_thw[a:b] for a, b in spans])
        positions, _ = inner.model.get_rope_index(ids, types, image_grid_thw=grid, attention_mask=mask)
        n = prompt - start - 1  # the prompt's last token runs with the completion: it predicts the first
        (a, b), first = spans[0], {}
        if b > a and pixel_starts is not None and image_grid_thw is not None:
            first = {
                "pixel_values": pixel_values[int(pixel_starts[a]) : int(pixel_starts[b])],
                "image_grid_thw": image_grid_thw[a:b],
            }
        kv = output_kv(
            inner.model(
                input_ids=ids[:1, :n],
                mm_token_type_ids=types[:1, :n],
                position_ids=positions[:, :1, :n],
                attention_mask=mask[:1, :n],
                use_cache=True,
                **first,
            )
        )
        out = model(
            input_ids=ids[:, n:],
            mm_token_type_ids=types[:, n:],
            position_ids=positions[:, :, n:],
            attention_mask=mask,
            labels=ids[:, n:].masked_fill(mask[:, n:] == 0, -100),
            fused_lm_head=True,
            **{keyword: kv_cache(inner, kv, len(rows))},
        )
        order.extend(rows)
        logps_rows.append(out.log_probs[:, -logits_to_keep:])
        if compute_entropy:
            entropy_rows.append(out.entropy[:, -logits_to_keep:])
    back = torch.argsort(torch.tensor(order, device=input_ids.device))  # rows in the caller's order
    logps = torch.cat(logps_rows)[back]
    entropies = torch.cat(entropy_rows)[back] if compute_entropy else None
    return logps, entropies, None


def _tool_seconds(environments: list[MedGymToolEnv] | None) -> float:
    return sum(c.seconds for env in environments or [] for c in env.calls)


CUT_WARNING = 0.05  # share of a step's rollouts cut by the token budget above which the run warns
ERR_CUT = (
    "{share:.0%} of this step's rollouts ended on a tool call whose result did not fit max_completion_length "
    "({budget} tokens, tool results and their pictures included): TRL drops that result and ends the rollout "
    "there, without an answer, so those rollouts score 0 whatever they would have answered, and rollouts "
    "that answer early beat the ones that look further. Raise max_completion_length until "
    "rollouts/cut_by_budget is near 0."
)


def cut_by_budget(completion: Any, rounds: int) -> bool:
    """Whether a rollout ended on a tool call that never ran with tool rounds left: TRL's tool loop drops a
    tool result that would push the rollout past ``max_completion_length`` and ends the rollout there.

    >>> call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "measure"}}]}
    >>> cut_by_budget([call, {"role": "tool", "content": "[measure] ..."}, call], rounds=4)
    True
    >>> cut_by_budget([call, {"role": "tool", "content": "[measure] ..."}, call], rounds=1)
    False
    >>> cut_by_budget([{"role": "assistant", "content": "<answer>B</answer>"}], rounds=4)
    False
    """
    if not isinstance(completion, list) or not completion:
        return False
    last = completion[-1]
    pending = isinstance(last, dict) and last.get("role") == "assistant" and bool(last.get("tool_calls"))
    return pending and tool_turns(completion) < rounds


def tool_turns(completion: Any) -> int:
    """How many tool results a (conversational) completion holds."""
    if not isinstance(completion, list):
        return 0
    return sum(1 for m in completion if isinstance(m, dict) and m.get("role") == "tool")


class MedGymReward:
    """One medgym reward function in TRL's signature, fed ``tool_calls_ok`` from the rollouts' bridges."""

    def __init__(self, name: str):
        if name not in REWARD_FUNCS:
            raise ValueError(f"unknown reward {name!r}; choose from {sorted(REWARD_FUNCS)}")
        self.name = name
        self.__name__ = name

    def __call__(self, completions: list[Any], environments: list[MedGymToolEnv] | None = None, **kwargs: Any):
        if environments is not None:
            kwargs["tool_calls_ok"] = [
                ok_calls_among_first(env, tool_turns(c)) for env, c in zip(environments, completions, strict=True)
            ]
        return REWARD_FUNCS[self.name](completions, **kwargs)


class ToolFailurePenalty:
    """Minus the share of a rollout's tool calls that failed (0.0 with no calls), from the rollouts' bridges.

    A GRPO-only term (``tool_failure_weight``), not one of the env's rewards: a call with arguments the
    tool rejects teaches nothing and costs a turn, and without it a policy sampling at temperature
    drifts into ever longer malformed calls that no other term tells apart.
    """

    __name__ = "tool_failure"

    def __call__(self, completions: list[Any], environments: list[MedGymToolEnv] | None = None, **kwargs: Any):
        if environments is None:
            return [0.0] * len(completions)
        out = []
        for env, completion in zip(environments, completions, strict=True):
            seen = min(tool_turns(completion), len(env.calls))
            out.append((ok_calls_among_first(env, seen) - seen) / seen if seen else 0.0)
        return out


def reward_functions(names: list[str] | None = None) -> tuple[list[MedGymReward], list[float]]:
    names = names or list(REWARD_FUNCS)
    return [MedGymReward(n) for n in names], [float(REWARD_WEIGHTS[n]) for n in names]


def case_row(case: Case, stages: list[str] | None = None, tool_mode: str = DEFAULT_TOOL_MODE) -> dict[str, Any]:
    """A dataset row: prompt, question pictures, case id (seed, source, stages drawn from) and reward columns."""
    messages, images = prompt_messages(case, tool_mode)
    columns = case.reward_columns()
    return {
        "prompt": messages,
        "images": images,
        "case_seed": case.seed,
        "source": case.source,
        "stages": list(stages or []),
        "answer": columns["answer"],
        "answer_type": columns["answer_type"],
        "choices": list(columns["choices"]),
        "tolerance": float(columns["tolerance"]),
        "abs_tolerance": float(columns["abs_tolerance"]),
        "answer_box": [float(v) for v in columns["answer_box"]] if columns["answer_box"] is not None else None,
        "stage": columns["stage"],
    }


def build_dataset(
    seeds: list[int], source: str = "phantom", stages: list[str] | None = None, tool_mode: str = DEFAULT_TOOL_MODE
):
    """A ``datasets.Dataset`` of cases for GRPO, optionally from some stages only."""
    from datasets import Dataset, Features, Image, List, Value

    src = stage_source(source, stages)
    rows = [case_row(src.case(s), stages, tool_mode) for s in seeds]
    features = Features(
        {
            "prompt": List({"role": Value("string"), "content": Value("string")}),
            "images": List(Image()),
            "case_seed": Value("int64"),
            "source": Value("string"),
            "stages": List(Value("string")),
            "answer": Value("string"),
            "answer_type": Value("string"),
            "choices": List(Value("string")),
            "tolerance": Value("float64"),
            "abs_tolerance": Value("float64"),
            "answer_box": List(Value("float64")),
            "stage": Value("string"),
        }
    )
    return Dataset.from_list(rows, features=features)


def make_trainer(
    model,
    processor,
    dataset,
    args: GRPOConfig,
    callbacks=None,
    reward_names: list[str] | None = None,
    extra_rewards: list[tuple[Any, float]] | None = None,
    tools: list[dict[str, Any]] | None = None,
):
    """The trainer: medgym rewards (plus ``extra_rewards`` as (func, weight)), one bridge env per rollout.

    ``tools``: the schemas prompts show (a checkpoint's recorded ``tool_schemas``); None: the contract's.

    Reward weights are the env's (:data:`~medgym.environments.rewards.REWARD_WEIGHTS`) unless the config's
    ``reward_weights`` lists one per reward, in :data:`~medgym.environments.rewards.REWARD_FUNCS` order.

    Each rollout's env runs the tools with ``args.segmenter`` in ``args.tool_mode``.
    """
    funcs, weights = reward_functions(reward_names)
    given, ours = args.reward_weights, len(funcs)
    if args.tool_failure_weight > 0:
        funcs.append(ToolFailurePenalty())
        weights.append(float(args.tool_failure_weight))
    for func, weight in extra_rewards or []:
        funcs.append(func)
        weights.append(float(weight))
    if given is not None:
        if len(given) == ours:  # the config's, in REWARD_FUNCS order
            weights[:ours] = [float(w) for w in given]
        elif len(given) == len(funcs):  # a whole list (these args built a trainer before)
            weights = [float(w) for w in given]
        else:
            names = [f.name for f in funcs[:ours]]
            raise ValueError(
                f"reward_weights has {len(given)} values; give one per reward, in this order: {', '.join(names)}"
            )
    args.reward_weights = weights
    return MedGymGRPOTrainer(
        model=model,
        processing_class=processor,
        reward_funcs=funcs,
        args=args,
        train_dataset=dataset,
        environment_factory=functools.partial(MedGymToolEnv, segmenter=args.segmenter, tool_mode=args.tool_mode),
        callbacks=callbacks,
        tools=tools,
    )


__all__ = [
    "MedGymGRPOTrainer",
    "MedGymReward",
    "ToolFailurePenalty",
    "build_dataset",
    "cut_by_budget",
    "case_row",
    "make_trainer",
    "reward_functions",
    "tool_turns",
]
