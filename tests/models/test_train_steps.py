"""Every zoo architecture trains through medgym's own loop, tool images included.

For each architecture (tiny, random weights): one SFT step of :class:`medgym.rl.sft.SharedPrefixSFTTrainer`
on an expert conversation whose tool turn carries a picture (the expert zooms), and one GRPO step of
:func:`medgym.rl.grpo.make_trainer` (TRL's ``GRPOTrainer(environment_factory=...)``) whose first turn
is scripted to call ``zoom`` (random weights never call a tool by themselves). Every forward that
computes a loss is watched: as many image placeholder tokens as the vision tower's feature rows, the
tool's picture among them (TRL issue 5663: Qwen2/2.5-VL's and Gemma's own templates drop images in
tool messages; the zoo's keep them); the vision tower gets gradients and the step moves it.
"""

from __future__ import annotations

import functools
import inspect
import math
from contextlib import contextmanager

import pytest
import torch

from medgym.models.zoo import ARCHS

ARCH_NAMES = list(ARCHS)
IMAGE_TOKENS = 16  # per picture, every zoo architecture (zoo.py fixes the image processors)
ZOOM_CALL = '<tool_call>\n{"name": "zoom", "arguments": {"boxes": [[0, 0, 128, 128]]}}\n</tool_call>'
DIRECT_ANSWER = "<answer>no</answer>"


def zero_image_projector(model) -> bool:
    """Whether the model projects every image feature to zero (Gemma 3's projector as transformers initialises it)."""
    projector = getattr(model.model, "multi_modal_projector", None)
    weight = getattr(projector, "mm_input_projection_weight", None)
    return weight is not None and not bool(weight.detach().any())


def vision_tower(model) -> torch.nn.Module:
    """The image encoder of a zoo model (Qwen: ``visual``; Idefics3: ``vision_model``; Gemma 3: ``vision_tower``)."""
    for name in ("visual", "vision_model", "vision_tower"):
        if hasattr(model.model, name):
            return getattr(model.model, name)
    raise AssertionError(f"no vision tower on {type(model.model).__name__}")


def feature_rows(output) -> int:
    """Rows of image features ``get_image_features`` made: one per image placeholder token it must fill."""
    pooled = output.pooler_output
    parts = pooled if isinstance(pooled, (list, tuple)) else [pooled]
    return sum(p.reshape(-1, p.shape[-1]).shape[0] for p in parts)


def image_inputs(model, example: dict) -> dict:
    """The example's fields that the architecture's ``get_image_features`` takes (pixels, grids, pixel masks)."""
    params = inspect.signature(model.model.get_image_features).parameters
    return {k: v for k, v in example.items() if k in params}


@contextmanager
def watch_image_forwards(model):
    """Records each forward with pictures that builds a graph: placeholder tokens, feature rows, image token types.

    Forwards without gradient (generation, its image pre-encoding) are not recorded.
    ``get_image_features`` is wrapped with its signature kept: generation reads it to pre-encode pictures.
    """
    inner = model.model
    image_id = model.config.image_token_id
    seen: list[dict] = []
    original = inner.get_image_features

    @functools.wraps(original)
    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        if torch.is_grad_enabled() and seen and seen[-1]["rows"] is None:
            seen[-1]["rows"] = feature_rows(out)
        return out

    def before_forward(module, args, kwargs):
        if torch.is_grad_enabled() and kwargs.get("pixel_values") is not None:
            ids = kwargs["input_ids"]
            types = kwargs.get("token_type_ids")
            seen.append(
                {
                    "tokens": int((ids == image_id).sum()),
                    "rows": None,
                    "typed": None if types is None else int(((types == 1) & (ids == image_id)).sum()),
                    "typed_all": None if types is None else int((types == 1).sum()),
                }
            )

    inner.get_image_features = counted
    handle = inner.register_forward_pre_hook(before_forward, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()
        del inner.get_image_features


@contextmanager
def watch_generation(model):
    """Records each generation step that reads pictures: placeholder tokens, image token types, pictures given.

    Generation pre-encodes the pictures (``mm_encoder_outputs``); its first step gets every placeholder.
    Token types: ``token_type_ids`` (Gemma 3) or ``mm_token_type_ids`` (Qwen); Idefics3 takes none.
    """
    image_id = model.config.image_token_id
    seen: list[dict] = []

    def before_forward(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if torch.is_grad_enabled() or ids is None or not bool((ids == image_id).any()):
            return
        types = next((kwargs[k] for k in ("token_type_ids", "mm_token_type_ids") if kwargs.get(k) is not None), None)
        seen.append(
            {
                "rows": ids.shape[0],
                "tokens": int((ids == image_id).sum()),
                "typed": None if types is None else int(((types == 1) & (ids == image_id)).sum()),
                "typed_all": None if types is None else int((types == 1).sum()),
                "pictures": any(kwargs.get(k) is not None for k in ("pixel_values", "mm_encoder_outputs")),
            }
        )

    handle = model.register_forward_pre_hook(before_forward, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def watch_vision_grads(model):
    """Sum of absolute gradients each vision-tower parameter received, and the parameters before the step."""
    grads: dict[str, float] = {}
    params = {n: p for n, p in vision_tower(model).named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}

    def keep(name):
        def hook(grad):
            grads[name] = grads.get(name, 0.0) + float(grad.abs().sum())

        return hook

    handles = [p.register_hook(keep(n)) for n, p in params.items()]
    try:
        yield grads, before, params
    finally:
        for h in handles:
            h.remove()


def assert_vision_tower_trained(grads: dict[str, float], before: dict, params: dict) -> None:
    assert set(grads) == set(params), f"no gradient reached {sorted(set(params) - set(grads))[:3]}"
    nonzero = [n for n, g in grads.items() if g > 0]
    assert len(nonzero) >= 0.9 * len(params), f"zero gradients on {sorted(set(params) - set(nonzero))[:5]}"
    first = next(iter(params))  # the patch embedding: gradients went through the whole tower
    assert grads[first] > 0, first
    moved = [n for n in nonzero if not torch.equal(before[n], params[n].detach())]
    assert moved == nonzero


# ------------------------------------------------------------------ SFT


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_sft_step_trains_the_vision_tower_on_a_tool_image(arch, zoo_model, look_case, tmp_path):
    from medgym.rl.config import SFTConfig
    from medgym.rl.sft import ConversationDataset, SharedPrefixSFTTrainer, has_multimodal_rope

    model, processor = zoo_model(arch)
    dataset = ConversationDataset([look_case], processor)  # predicted mode: the expert runs detect, then answers
    example = dataset[0]
    ids, labels = example["input_ids"][0], example["labels"][0]

    # The question's picture and the tool's picture (the candidates drawn): as many placeholders as the vision tower makes rows.
    image_at = (ids == model.config.image_token_id).nonzero().flatten()
    with torch.no_grad():
        rows = feature_rows(model.model.get_image_features(**image_inputs(model, example)))
    assert len(image_at) == rows == 2 * IMAGE_TOKENS
    first_label = int((labels != -100).nonzero()[0])
    assert int(image_at[-1]) > first_label  # the tool picture sits after the assistant's call: inside the tool turn
    # Only the assistant's turns are trained on: the call and the answer, each with its end-of-turn token.
    target = processor.tokenizer.decode(labels[labels != -100])
    assert '"name": "detect"' in target and "<answer>" in target and "[detect]" not in target

    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=1,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        save_steps=0,
        report_to="none",
        disable_tqdm=True,
    )
    trainer = SharedPrefixSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    assert trainer.shares_prefix == has_multimodal_rope(model) == arch.startswith("qwen")
    # zoo.py initialises Gemma 3's projector (transformers' zeros would make every image feature 0)
    assert not zero_image_projector(model)
    with watch_image_forwards(model) as seen, watch_vision_grads(model) as (grads, before, params):
        result = trainer.train()
    assert math.isfinite(result.training_loss) and result.training_loss > 0
    assert [(f["tokens"], f["rows"]) for f in seen] == [(2 * IMAGE_TOKENS, 2 * IMAGE_TOKENS)]
    if seen[0]["typed"] is not None:  # Gemma 3: image tokens attend to each other (token type 1)
        assert seen[0]["typed"] == seen[0]["typed_all"] == 2 * IMAGE_TOKENS
    assert_vision_tower_trained(grads, before, params)


# ------------------------------------------------------------------ GRPO


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_tokenizer_parses_its_templates_tool_calls(arch, zoo_model):
    """GRPO reads tool calls with the tokenizer's response template: TRL's for the Qwen family, the zoo's otherwise."""
    from trl.chat_template_utils import add_response_schema, parse_response

    from medgym.models.zoo import TRL_TEMPLATE, response_template

    _, processor = zoo_model(arch)
    saved = getattr(processor.tokenizer, "response_template", None)
    if ARCHS[arch].template == TRL_TEMPLATE:
        assert saved is None
        add_response_schema(processor)  # what GRPOTrainer does; raises for a template TRL does not know
    else:  # the zoo's parser, saved with the folder's tokenizer
        assert saved == response_template(ARCHS[arch].template) is not None
    tok = processor.tokenizer
    messages = [{"role": "user", "content": [{"type": "text", "text": "Is there a lesion?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[0]
    completion = tok.encode(ZOOM_CALL, add_special_tokens=False) + [tok.eos_token_id]
    parsed = parse_response(tok, completion, prefix=list(prompt))
    assert [c["function"] for c in parsed.get("tool_calls") or []] == [
        {"name": "zoom", "arguments": {"boxes": [[0, 0, 128, 128]]}}
    ]


def test_fix_to_the_arch_template_brings_its_parser(zoo_dir, tmp_path):
    """``medgym check --fix`` installing medgym's template also installs its response template, replacing the folder's."""
    import json
    import shutil

    from transformers import AutoProcessor

    from medgym.cli import main
    from medgym.models.zoo import chat_template, response_template

    bad = tmp_path / "bad"
    shutil.copytree(zoo_dir("gemma3"), bad)
    own = chat_template("medgym/tool_chat:gemma3")
    (bad / "chat_template.jinja").write_text(own.replace("{%- if tools -%}", "{%- if false -%}", 1))
    config_file = bad / "tokenizer_config.json"
    stale = {"defaults": {"role": "assistant"}, "start_anchor": "<start_of_turn>model\n", "fields": {}}
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "response_template": stale}))

    assert main(["check", "--model", str(bad), "--fix", str(tmp_path / "fixed")]) == 0
    tok = AutoProcessor.from_pretrained(tmp_path / "fixed").tokenizer
    assert tok.response_template == response_template("medgym/tool_chat:gemma3") != stale


def _grpo_args(tmp_path):
    from medgym.rl.config import GRPOConfig

    return GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        train_seeds=[25, 1],
        max_steps=1,
        per_device_train_batch_size=2,
        num_generations=2,
        # The call (~18 tokens) and its result (16 image tokens, ~45 text tokens) must fit, or TRL drops the result.
        max_completion_length=128,
        max_tool_calling_iterations=1,
        beta=0.0,
        learning_rate=1e-3,
        temperature=1.0,
        save_steps=0,
        report_to="none",
        disable_tqdm=True,
    )


def tool_turn_reward(completions, **kwargs):
    """A test-only reward that differs within the group (one rollout calls a tool, one does not): non-zero advantages."""
    from medgym.rl.grpo import tool_turns

    return [float(tool_turns(c)) for c in completions]


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_grpo_step_feeds_the_tool_image_to_the_loss(arch, zoo_model, tmp_path):
    from medgym.rl.grpo import build_dataset, make_trainer

    model, processor = zoo_model(arch)
    image_id = model.config.image_token_id
    trainer = make_trainer(
        model, processor, build_dataset([25]), _grpo_args(tmp_path), extra_rewards=[(tool_turn_reward, 1.0)]
    )
    tok = processor.tokenizer
    sampled = trainer._generate_single_turn
    turns: list[dict] = []

    def first_turn_scripted(prompt_ids, images, fields, num_generations, has_tool_images=False):
        """Rollout 0 calls zoom and rollout 1 answers; the turn after the tool's picture is the model's own."""
        turns.append(
            {"question_tokens": sum(list(p).count(image_id) for p in prompt_ids), "tool_images": has_tool_images}
        )
        if len(turns) > 1:
            return sampled(prompt_ids, images, fields, num_generations, has_tool_images)
        assert len(prompt_ids) == 2
        end = trainer.eos_token_ids[0]
        return [tok.encode(t, add_special_tokens=False) + [end] for t in (ZOOM_CALL, DIRECT_ANSWER)], None

    trainer._generate_single_turn = first_turn_scripted
    with (
        watch_image_forwards(model) as seen,
        watch_vision_grads(model) as (grads, before, params),
        watch_generation(model) as generated,
    ):
        trainer.train()

    calls = [c for env in trainer._environment_pool[None] for c in env.calls]
    assert [(c.name, c.ok, c.n_images) for c in calls] == [("zoom", True, 1)]
    assert [t["tool_images"] for t in turns] == [False, True]  # the model generated after seeing the crop
    question_tokens = turns[0]["question_tokens"]
    assert question_tokens == 2 * IMAGE_TOKENS
    # The turn after the crop: the zooming rollout, its question and the crop given to generate, and (where the
    # model takes token types) every image token typed as one (Gemma 3's <image_soft_token>s too).
    (turn,) = generated
    assert turn["rows"] == 1 and turn["pictures"] and turn["tokens"] == 2 * IMAGE_TOKENS
    assert (turn["typed"] is None) == (arch == "smolvlm")
    if turn["typed"] is not None:
        assert turn["typed"] == turn["typed_all"] == turn["tokens"]
    # The loss forwards (one batch, or one per rollout with the shared prefix) saw both questions and the crop.
    assert seen and all(f["tokens"] == f["rows"] for f in seen)
    assert sum(f["tokens"] for f in seen) == question_tokens + IMAGE_TOKENS > question_tokens
    for f in seen:
        if f["typed"] is not None:  # Gemma 3: image tokens attend to each other (token type 1)
            assert f["typed"] == f["typed_all"] == f["tokens"]
    assert_vision_tower_trained(grads, before, params)
