"""GRPO through TRL's GRPOTrainer(environment_factory=...) on the real medgym tools, with a tiny model."""

from __future__ import annotations

import pytest
import torch

GRPO_SEEDS = [2000, 2001]  # SFT cases whose expert starts with segment (an image-returning tool)


def _args(tmp_path, **kw):
    from medgym.rl.config import GRPOConfig

    return GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        train_seeds=[2000, 2],
        max_steps=kw.pop("max_steps", 2),
        per_device_train_batch_size=4,
        num_generations=kw.pop("num_generations", 4),
        max_completion_length=kw.pop("max_completion_length", 192),
        max_tool_calling_iterations=kw.pop("max_tool_calling_iterations", 3),
        learning_rate=1e-3,
        temperature=1.0,
        beta=0.0,
        save_steps=0,
        tool_mode="oracle",  # what the tiny policy was trained in (conftest.py)
        disable_tqdm=True,
        **kw,
    )


def _evidence_args(tmp_path, evidence, **kw):
    """One step of GRPO over ``answer_evidence`` prompts: constrained, the answer turn alone unless ``kw`` gives tool rounds."""
    kw.setdefault("max_tool_calling_iterations", 0)
    return _args(tmp_path, max_steps=1, constrained=True, answer_evidence=evidence, collapse_floor=0.0, **kw)


def _record_returns(trainer, name: str) -> list:
    """Wrap ``trainer.<name>`` so every value it returns is also appended to the returned list."""
    real, kept = getattr(trainer, name), []

    def recorded(*args, **kwargs):
        kept.append(real(*args, **kwargs))
        return kept[-1]

    setattr(trainer, name, recorded)
    return kept


def length_signal(completions, **kwargs):
    """A test-only reward that always differs within a group, so advantages (and gradients) are non-zero."""
    from medgym.environments.parsing import completion_text

    return [len(completion_text(c)) / 100 for c in completions]


@pytest.fixture
def trainer_parts(tiny_sft, tiny_source, tiny_tool_mode, tmp_path):
    from medgym.environments.expert import expert_calls
    from medgym.rl.grpo import build_dataset
    from medgym.rl.policy_model import load

    folder, _, _ = tiny_sft
    starts = [expert_calls(tiny_source.case(s), tiny_tool_mode)[0].name for s in GRPO_SEEDS]
    assert starts == ["segment", "segment"]
    model, processor = load(folder)
    model.train()
    stages = ["recognition", "measurement", "visual_reasoning"]
    return model, processor, build_dataset(GRPO_SEEDS, "phantom", stages, tiny_tool_mode)


def test_dataset_rows_carry_case_and_reward_columns(trainer_parts):
    _, _, dataset = trainer_parts
    row = dataset[0]
    assert row["case_seed"] == 2000 and row["source"] == "phantom"
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["images"][0].size == (128, 128)
    assert {"answer", "answer_type", "choices", "tolerance", "abs_tolerance", "answer_box", "stage"} <= set(row)


def test_rewards_count_only_tool_results_the_model_saw():
    from medgym.rl.bridge import CallRecord, MedGymToolEnv
    from medgym.rl.grpo import MedGymReward

    env = MedGymToolEnv()
    env.calls = [CallRecord("segment", {}, True, 1), CallRecord("measure", {}, True, 0)]
    seen_one = [
        {"role": "assistant", "content": "", "tool_calls": [{}]},
        {"role": "tool", "content": "x"},
        {"role": "assistant", "content": "<answer>yes</answer>"},
    ]
    dropped = [{"role": "assistant", "content": "<answer>yes</answer>"}]  # its tool result was rolled back
    bonus = MedGymReward("tool_use")
    cols = {"answer": ["yes", "yes"], "answer_type": ["yesno", "yesno"]}
    assert bonus([seen_one, dropped], environments=[env, env], **cols) == [1.0, 0.0]
    assert MedGymReward("answer")([seen_one, dropped], environments=[env, env], **cols) == [1.0, 1.0]
    with pytest.raises(ValueError, match="unknown reward"):
        MedGymReward("bogus")


def test_tool_failure_penalty_is_the_share_of_seen_calls_that_failed(trainer_parts, tmp_path):
    from medgym.rl.bridge import CallRecord, MedGymToolEnv
    from medgym.rl.grpo import ToolFailurePenalty, make_trainer

    env = MedGymToolEnv()
    env.calls = [
        CallRecord("segment", {}, "1", "mask_1: ..."),
        CallRecord("measure", {}, "3", "Error: invalid arguments", error=True),
        CallRecord("zoom", {}, "1", "Error: box is empty", error=True),
    ]
    call, result = {"role": "assistant", "content": "", "tool_calls": [{}]}, {"role": "tool", "content": "x"}
    answer = {"role": "assistant", "content": "<answer>yes</answer>"}
    two_seen = [call, result, call, result, answer]  # the third call's result was rolled back: not counted
    penalty = ToolFailurePenalty()
    assert penalty([two_seen, [answer]], environments=[env, env]) == [-0.5, 0.0]
    assert penalty([two_seen]) == [0.0]  # no environments: nothing to judge

    model, processor, dataset = trainer_parts
    off = make_trainer(model, processor, dataset, _args(tmp_path))
    on = make_trainer(model, processor, dataset, _args(tmp_path, tool_failure_weight=0.3))
    assert "tool_failure" not in [f.__name__ for f in off.reward_funcs]
    assert on.reward_funcs[-1].__name__ == "tool_failure" and float(on.reward_weights[-1]) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="tool_failure_weight"):
        _args(tmp_path, tool_failure_weight=-1.0)


def test_reward_weights_of_the_wrong_length_are_refused(trainer_parts, tmp_path):
    """A config's reward_weights name one weight per medgym reward, in order; a list of another length is an
    error naming that order (it was silently replaced by the defaults)."""
    from medgym.environments.rewards import REWARD_FUNCS
    from medgym.rl.grpo import make_trainer

    model, processor, dataset = trainer_parts
    mine = [1.0, 0.0, 0.3, 0.0, 0.5]
    assert len(mine) == len(REWARD_FUNCS)
    args = _args(tmp_path, tool_failure_weight=0.2, reward_weights=mine)
    trainer = make_trainer(model, processor, dataset, args)
    assert trainer.reward_weights.tolist() == pytest.approx([*mine, 0.2])
    again = make_trainer(model, processor, dataset, args)  # the same args, now holding the whole list
    assert again.reward_weights.tolist() == pytest.approx([*mine, 0.2])
    with pytest.raises(ValueError, match="reward_weights has 4 values.*" + ", ".join(REWARD_FUNCS)):
        make_trainer(model, processor, dataset, _args(tmp_path, reward_weights=mine[:4]))


def test_list_image_fields_regression(trainer_parts, tmp_path):
    """TRL 1.16 returns image fields as lists under environment_factory; split_pixel_values_by_grid then crashes.

    It happens with the PIL image processor (what AutoProcessor picks without torchvision): its
    arrays are not tensors, so TRL's merge keeps them as Python lists.
    """
    from transformers import Qwen2VLImageProcessorPil
    from trl import GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages
    from trl.trainer.utils import split_pixel_values_by_grid

    from medgym.rl.grpo import make_trainer

    model, processor, dataset = trainer_parts
    trainer = make_trainer(model, processor, dataset, _args(tmp_path))
    fast = processor.image_processor
    trainer.processing_class.image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size=dict(fast.size),
        image_mean=fast.image_mean,
        image_std=fast.image_std,
    )
    prompts = [prepare_multimodal_messages(row["prompt"], images=row["images"]) for row in dataset]
    trainer._batch_environments = [None] * len(prompts)
    _, _, fields = GRPOTrainer._tokenize_prompts(trainer, prompts)  # TRL's own
    fields["num_images"] = [1, 1]
    assert isinstance(fields["image_grid_thw"], list)
    with pytest.raises(AttributeError, match="'list' object has no attribute 'prod'"):
        split_pixel_values_by_grid(fields)
    _, _, fixed = trainer._tokenize_prompts(prompts)  # the subclass
    fixed["num_images"] = [1, 1]
    split = split_pixel_values_by_grid(fixed)
    assert [g.tolist() for g in split["image_grid_thw"]] == [[[1, 8, 8]], [[1, 8, 8]]]


def test_grpo_steps_run_real_tools(trainer_parts, tmp_path):
    from transformers import TrainerCallback

    from medgym.rl.grpo import make_trainer

    model, processor, dataset = trainer_parts
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: list[tuple[int, int]] = []  # (image tokens, image features) of every forward with pictures
    inner = model.model.get_placeholder_mask

    def checked(input_ids, inputs_embeds, image_features=None, video_features=None):
        if image_features is not None and input_ids is not None:
            seen.append((int((input_ids == model.config.image_token_id).sum()), int(image_features.shape[0])))
        return inner(input_ids, inputs_embeds, image_features=image_features, video_features=video_features)

    model.model.get_placeholder_mask = checked
    logs: list[dict] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs_=None, **kwargs):
            logs.append(dict(kwargs.get("logs") or logs_ or {}))

    trainer = make_trainer(
        model, processor, dataset, _args(tmp_path), callbacks=[Keep()], extra_rewards=[(length_signal, 0.1)]
    )
    trainer.train()

    envs = trainer._environment_pool[None]
    calls = [c for env in envs for c in env.calls]
    assert calls, "no tool call was executed"
    assert any(c.ok and c.n_images for c in calls), "no image-returning tool ran"
    assert seen and all(t == f for t, f in seen)
    assert max(t for t, _ in seen) > 16  # a forward saw the question picture *and* a tool picture
    merged = {k: v for row in logs for k, v in row.items()}
    assert "reward" in merged and "rewards/answer/mean" in merged and merged["tools/call_frequency"] > 0
    assert merged["timing/rollout_seconds"] > 0 and 0 < merged["timing/tool_share"] < 1
    assert 0.0 <= merged["tools/failed_share"] <= 1.0
    tool_seconds = sum(c.seconds for c in calls)
    assert tool_seconds > 0 and all(c.seconds >= 0 for c in calls)
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed


def test_shared_prefix_log_probs_equal_trls_batched_forward(trainer_parts, tmp_path, monkeypatch):
    """The log-prob pass that runs the common system text once gives TRL's values and gradients."""

    import medgym.rl.grpo as grpo

    model, processor, dataset = trainer_parts
    trainer = grpo.make_trainer(model, processor, dataset, _args(tmp_path, max_steps=1, num_generations=2))
    assert trainer.args.shared_prefix
    captured, ours = _spy_logp_pass(monkeypatch)
    shared = []
    real_shared = grpo.shared_prefix_logps

    def spy_shared(*args, **kwargs):
        shared.append(args[6])  # the prefix length
        return real_shared(*args, **kwargs)

    monkeypatch.setattr(grpo, "shared_prefix_logps", spy_shared)
    trainer.train()
    assert shared and min(shared) > 100  # the system text and tool list ran once per pass
    _assert_equals_trls_pass(trainer, model, ours, captured[-1])


def _spy_logp_pass(monkeypatch) -> tuple[list, object]:
    """Record every call of the trainer's log-prob pass: the list of (args, kwargs), and the pass itself."""
    import medgym.rl.grpo as grpo

    captured: list = []
    ours = grpo.MedGymGRPOTrainer._get_per_token_logps_and_entropies

    def spy(self, *args, **kwargs):
        captured.append((args, kwargs))
        return ours(self, *args, **kwargs)

    monkeypatch.setattr(grpo.MedGymGRPOTrainer, "_get_per_token_logps_and_entropies", spy)
    return captured, ours


def _assert_equals_trls_pass(trainer, model, ours, call) -> None:
    """One recorded loss pass (model, input_ids, attention_mask, logits_to_keep, ...) redone by ``ours`` and by
    TRL's batched forward: equal log-probs, entropies and gradients, the visual tower's included."""
    from trl import GRPOTrainer

    args, kwargs = call
    keep = args[3]
    valid = args[2][:, -keep:].bool()
    assert valid.sum() > 0 and not args[2][:, :-keep].all(), "the rows' prompts were not of different lengths"
    kwargs = {**kwargs, "compute_entropy": True}

    def run(fn):
        model.zero_grad()
        logps, entropy, _ = fn(trainer, *args, **kwargs)
        (logps * valid).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logps.detach(), entropy.detach(), grads

    a_logps, a_entropy, a_grads = run(ours)
    b_logps, b_entropy, b_grads = run(GRPOTrainer._get_per_token_logps_and_entropies)
    torch.testing.assert_close(a_logps[valid], b_logps[valid], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(a_entropy[valid], b_entropy[valid], atol=2e-4, rtol=1e-4)
    assert a_grads.keys() == b_grads.keys() and any("visual" in n for n in a_grads)
    for name in a_grads:
        torch.testing.assert_close(a_grads[name], b_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_collapse_guard_stops_training_when_tool_calls_die_out():
    from transformers import TrainerControl, TrainerState

    from medgym.rl.curve import CollapseGuard

    guard, control, state = CollapseGuard(floor=0.5, patience=2), TrainerControl(), TrainerState()
    for step, freq in enumerate([0.9, 0.4, 0.8, 0.3], start=1):  # dips that recover do not stop it
        state.global_step = step
        guard.on_log(None, state, control, logs={"tools/call_frequency": freq})
    assert not control.should_training_stop and guard.stopped is None
    state.global_step = 5
    guard.on_log(None, state, control, logs={"tools/call_frequency": 0.1})
    assert control.should_training_stop
    assert "tool-call collapse" in guard.stopped and "step 5" in guard.stopped and "collapse_floor=0.5" in guard.stopped
    off = CollapseGuard(floor=0.0)
    off.on_log(None, state, TrainerControl(), logs={"tools/call_frequency": 0.0, "tools/failed_share": 1.0})
    assert off.stopped is None


def test_drift_guard_stops_training_when_failed_calls_persist():
    from transformers import TrainerControl, TrainerState

    from medgym.rl.curve import CollapseGuard

    guard, control, state = CollapseGuard(floor=0.0, patience=3, failure_ceiling=0.25), TrainerControl(), TrainerState()
    for step, share in enumerate([0.1, 0.4, 0.5, 0.2, 0.3, 0.3], start=1):  # two in a row, then a dip: no stop
        state.global_step = step
        guard.on_log(None, state, control, logs={"tools/call_frequency": 2.0, "tools/failed_share": share})
    assert not control.should_training_stop and guard.stopped is None
    state.global_step = 7
    guard.on_log(None, state, control, logs={"tools/call_frequency": 2.0, "tools/failed_share": 0.45})
    assert control.should_training_stop
    assert "tool-call drift" in guard.stopped and "failure_ceiling=0.25" in guard.stopped and "step 7" in guard.stopped


def test_curve_seeds_must_not_overlap_training(tmp_path):
    with pytest.raises(ValueError, match="curve_seeds"):
        _args(tmp_path, curve_every=5, curve_seeds=[2000, 10])
    assert _args(tmp_path, curve_every=5, curve_seeds=[0, 100]).curve_every == 5


def test_held_out_curve_logs_points_before_and_during_training(trainer_parts, tmp_path):
    from medgym.rl.curve import HeldOutCurve
    from medgym.rl.grpo import make_trainer
    from medgym.rl.metrics import GRPO_PANELS, MetricsLog

    model, processor, dataset = trainer_parts
    args = _args(tmp_path, max_steps=1, curve_every=1, curve_seeds=[5000, 2], segmenter="threshold")
    metrics = MetricsLog(tmp_path / "m")
    curve = HeldOutCurve(args, metrics, {"model_id": "tiny"})
    make_trainer(model, processor, dataset, args, [curve]).train()
    assert [p["step"] for p in curve.points] == [0, 1]
    for point in curve.points:
        assert 0.0 <= point["heldout/accuracy"] <= 1.0 and point["heldout/tool_calls_per_episode"] >= 0
        assert "heldout/grounding_iou" in point and "heldout/format_errors_per_episode" in point
    assert [r["step"] for r in metrics.rows()] == [0, 1]
    assert metrics.plot(GRPO_PANELS, "grpo.png").stat().st_size > 10_000


def _train_keeping_completions(trainer) -> list:
    """Train, and return every rollout completion the (first) reward function was given."""
    seen: list = []
    score = trainer.reward_funcs[0]

    def keep(completions, **kwargs):
        seen.extend(completions)
        return score(completions, **kwargs)

    keep.__name__ = score.__name__
    trainer.reward_funcs[0] = keep
    trainer.train()
    return seen


def test_constrained_rollouts_are_well_formed_turns_with_bounded_text(trainer_parts, tmp_path):
    """Under ``constrained`` every rollout turn is one tool call or an answer, its free text within ROLLOUT_LIMITS:
    the limits the embedded backend decodes with, so rollouts are written under the grammar evaluation reads."""
    from medgym.agents.backends import EmbeddedBackend
    from medgym.environments.parsing import completion_text, parse_action
    from medgym.rl.grpo import ROLLOUT_LIMITS, make_trainer

    assert EmbeddedBackend().turn_limits == ROLLOUT_LIMITS

    model, processor, dataset = trainer_parts
    trainer = make_trainer(model, processor, dataset, _args(tmp_path, max_steps=1, constrained=True))
    seen = _train_keeping_completions(trainer)

    assert len(seen) == 4
    turns = [m for c in seen for m in c if m.get("role") == "assistant"]
    assert len(turns) > len(seen), "no rollout called a tool"
    for turn in turns:
        text = completion_text([turn])
        action = parse_action(text)
        calls = turn.get("tool_calls") or []
        assert len(calls) <= ROLLOUT_LIMITS.max_calls, turn
        if action.answer is not None:
            assert len(action.answer) <= ROLLOUT_LIMITS.answer_chars
        for call in calls:
            strings = [v for v in call["function"]["arguments"].values() if isinstance(v, str)]
            assert all(len(s) <= ROLLOUT_LIMITS.string_chars for s in strings), call
        assert not text.split("<")[0].strip(), f"thought text before the call or answer: {text!r}"


def test_prefix_cached_generation_equals_plain_generation(trainer_parts, tmp_path, monkeypatch):
    """Rollout turns with the shared prefix run once decode what plain ``generate`` decodes, tool pictures included."""
    import medgym.rl.grpo as grpo

    model, processor, dataset = trainer_parts
    trainer = grpo.make_trainer(model, processor, dataset, _args(tmp_path, max_steps=1, num_generations=2))
    turns: list[dict] = []
    real = grpo.prefix_cached_generate

    def spy(generate, inner, turn_start, **kwargs):
        turns.append(dict(kwargs))
        return real(generate, inner, turn_start, **kwargs)

    monkeypatch.setattr(grpo, "prefix_cached_generate", spy)
    trainer.train()
    assert len(turns) >= 2, "no tool round was generated"
    assert any(t.get("mm_token_type_ids") is not None and int(t["mm_token_type_ids"].sum()) > 16 * 4 for t in turns)
    assert any(not t["attention_mask"].all() for t in turns), "no turn had rows of different lengths"
    model.eval()
    turn_start = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    for inputs in turns:
        inputs = {k: v for k, v in inputs.items() if k != "generation_config"}
        rows = grpo.rollout_rows(inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"])
        assert grpo.common_prefix(rows, turn_start) > 100
        settings = {"do_sample": False, "max_new_tokens": 24, "output_scores": True, "return_dict_in_generate": True}
        with torch.no_grad():
            plain = model.generate(**inputs, **settings)
            cached = real(model.generate, model, turn_start, **inputs, **settings)
        width = inputs["input_ids"].size(1)
        assert torch.equal(plain.sequences[:, width:], cached.sequences[:, width:])
        torch.testing.assert_close(plain.scores[0], cached.scores[0], atol=1e-4, rtol=1e-4)


def test_rollouts_cut_by_the_token_budget_are_counted_and_warned_of(trainer_parts, tmp_path, caplog):
    """A tool result that does not fit ``max_completion_length`` ends the rollout on its call, unanswered:
    ``rollouts/cut_by_budget`` counts those rollouts and the run warns, naming the setting to raise."""
    from transformers import TrainerCallback

    from medgym.rl.grpo import cut_by_budget, make_trainer

    model, processor, dataset = trainer_parts
    logs: list[dict] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs_=None, **kwargs):
            logs.append(dict(kwargs.get("logs") or logs_ or {}))

    shares = {}
    for budget in (48, 1024):
        logs.clear()
        args = _args(tmp_path / str(budget), max_steps=1, constrained=True, max_completion_length=budget)
        trainer = make_trainer(model, processor, dataset, args, callbacks=[Keep()])
        with caplog.at_level("WARNING", logger="medgym.rl.grpo"):
            seen = _train_keeping_completions(trainer)
        cut = [c for c in seen if cut_by_budget(c, args.max_tool_calling_iterations)]
        shares[budget] = next(row["rollouts/cut_by_budget"] for row in logs if "rollouts/cut_by_budget" in row)
        assert shares[budget] == pytest.approx(len(cut) / len(seen))
        warned = [r for r in caplog.records if "max_completion_length" in r.getMessage()]
        assert bool(warned) == (shares[budget] > 0.05), (budget, shares[budget])
        caplog.clear()
        if budget == 48:
            assert cut, "no rollout was cut by a 48-token budget"
            assert all(c[-1]["role"] == "assistant" and c[-1]["tool_calls"] for c in cut)
    assert shares[1024] == 0.0 < shares[48]


def test_constrained_rollouts_answer_in_the_turn_after_the_last_tool_round(trainer_parts, tmp_path):
    """TRL runs no tool after the last round, so under ``constrained`` that turn can only be an answer."""
    from medgym.environments.parsing import completion_text, parse_action
    from medgym.rl.grpo import make_trainer

    model, processor, dataset = trainer_parts
    args = _args(tmp_path, max_steps=1, constrained=True, max_tool_calling_iterations=1)
    trainer = make_trainer(model, processor, dataset, args)
    seen = _train_keeping_completions(trainer)

    with_tools = [c for c in seen if any(m.get("role") == "tool" for m in c)]
    assert with_tools, "no rollout called a tool"
    for completion in with_tools:
        last = [m for m in completion if m.get("role") == "assistant"][-1]
        assert not last.get("tool_calls"), completion
        assert parse_action(completion_text([last])).answer is not None, completion


def test_answer_only_loss_covers_the_last_turn_and_no_call(trainer_parts, tmp_path):
    """``loss_on: answer``: the loss mask keeps the answer turn's tokens and drops every call's;
    ``advantage_floor: 0``: no rollout is pushed down, the better ones still up."""
    from medgym.rl.grpo import make_trainer

    model, processor, dataset = trainer_parts
    args = _args(
        tmp_path, max_steps=2, constrained=True, max_tool_calling_iterations=1, loss_on="answer", advantage_floor=0.0
    )
    trainer = make_trainer(model, processor, dataset, args, extra_rewards=[(length_signal, 0.1)])
    batches: list[dict] = []
    real = trainer._compute_loss

    def spy(model, inputs):
        batches.append({k: inputs[k].clone() for k in ("completion_ids", "completion_mask", "tool_mask", "advantages")})
        return real(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    assert batches
    advantages = torch.cat([b["advantages"] for b in batches])
    assert (advantages >= 0).all() and (advantages > 0).any(), advantages
    decode = processor.tokenizer.decode
    assert len(processor.tokenizer.encode("<answer>", add_special_tokens=False)) == 1
    with_tools = trained_rows = 0
    for batch in batches:
        for ids, kept, tools in zip(batch["completion_ids"], batch["completion_mask"], batch["tool_mask"], strict=True):
            trained = decode(ids[(kept * tools).bool()])
            with_tools += "<tool_response>" in decode(ids[kept.bool()])
            if trained:  # only what the answer says: not the call, nor the choice to answer
                trained_rows += 1
                assert "</answer>" in trained and "<answer>" not in trained and "<tool_call>" not in trained, trained
    assert with_tools and trained_rows, "no rollout called a tool, or none answered"


def test_evidence_prompts_need_no_collapse_floor(tmp_path):
    with pytest.raises(ValueError, match="collapse_floor: 0"):
        _args(tmp_path, answer_evidence="expert", collapse_floor=0.1)
    with pytest.raises(ValueError, match="collapse_floor: 0"):
        _args(tmp_path, answer_evidence="policy", collapse_floor=0.1)
    with pytest.raises(ValueError, match="answer_evidence"):
        _args(tmp_path, answer_evidence="teacher")


def test_evidence_rollouts_continue_with_the_prompts_tool_state(trainer_parts, tmp_path):
    """With tool rounds, a rollout of an evidence prompt continues that episode: its env starts with the masks
    and candidates the prompt's calls made, and what a rollout adds stays its own (the evidence's state, shared
    by its group, is unchanged). Calls on that state: tests/rl/test_bridge.py."""
    from medgym.environments.expert import expert_calls
    from medgym.rl.bridge import stage_source
    from medgym.rl.grpo import make_trainer

    model, processor, dataset = trainer_parts
    args = _evidence_args(tmp_path, "expert", max_tool_calling_iterations=1)
    trainer = make_trainer(model, processor, dataset, args, extra_rewards=[(length_signal, 0.1)])
    built = _record_returns(trainer, "_expert_evidence")
    seen = _train_keeping_completions(trainer)
    rows = [row for batch in built for row in batch]
    assert rows and seen
    source = stage_source("phantom", dataset[0]["stages"])
    for row in rows:
        segments = sum(c.name == "segment" for c in expert_calls(source.case(row["case_seed"]), args.tool_mode))
        assert len(row["tool_context"].masks) == segments  # the expert's masks, none a rollout added
    for env, row in zip(trainer.environments, rows[-len(trainer.environments) :], strict=True):
        assert set(row["tool_context"].masks) <= set(env.ctx.masks)  # the rollout started from them


def test_expert_evidence_rollouts_answer_after_the_experts_real_tool_results(trainer_parts, tmp_path):
    """``answer_evidence: expert``: each prompt is the expert's episode up to its answer (its calls, the real
    tools' results and pictures), each rollout one answer turn, and the loss pass sees every image token."""
    from medgym.environments.expert import expert_calls
    from medgym.rl.bridge import stage_source
    from medgym.rl.grpo import make_trainer

    model, processor, dataset = trainer_parts
    trainer = make_trainer(
        model, processor, dataset, _evidence_args(tmp_path, "expert"), extra_rewards=[(length_signal, 0.1)]
    )
    batches: list[dict] = []
    real = trainer._compute_loss

    def spy(model, inputs):
        batches.append({k: inputs[k].clone() for k in ("prompt_ids", "completion_ids", "mm_token_type_ids")})
        loss = real(model, inputs)
        assert torch.isfinite(loss)
        return loss

    trainer._compute_loss = spy
    trainer.train()
    assert batches
    decode, image_id = processor.tokenizer.decode, model.config.image_token_id
    source = stage_source("phantom", dataset[0]["stages"])  # the rows' cases
    expert_turns = {len(expert_calls(source.case(s), "oracle")) for s in dataset["case_seed"]}
    for batch in batches:
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        assert batch["mm_token_type_ids"].shape == ids.shape
        assert torch.equal(batch["mm_token_type_ids"].bool(), ids == image_id)
        for prompt, completion in zip(batch["prompt_ids"], batch["completion_ids"], strict=True):
            prompt_text, turn = decode(prompt), decode(completion)
            assert prompt_text.count("<tool_response>") in expert_turns, prompt_text[-400:]
            assert prompt_text.rstrip().endswith("<|im_start|>assistant"), prompt_text[-200:]
            assert "<answer>" in turn and "<tool_call>" not in turn, turn


def test_policy_evidence_prompts_are_the_policys_own_episode(trainer_parts, tiny_sft, tiny_source, tmp_path):
    """``answer_evidence: policy``: each prompt is the live policy's own greedy episode up to its answer (its
    calls and their real results, as ``medgym eval`` runs it), or the expert's where it gave no answer."""
    import gymnasium as gym

    from medgym.agents.backends import EmbeddedBackend
    from medgym.environments.evaluate import ENV_ID, run_episode
    from medgym.environments.expert import expert_calls
    from medgym.rl.grpo import make_trainer

    model, processor, dataset = trainer_parts
    folder, _, _ = tiny_sft
    # what the start policy does on each training case, greedy, through the eval path
    env = gym.make(ENV_ID, source="phantom", tool_mode="oracle", segmenter="threshold")
    policy = EmbeddedBackend(folder, constrained=True)
    expected, answered, own_turns = set(), [], []
    for seed in dataset["case_seed"]:
        ep = run_episode(env, policy, seed, case=tiny_source.case(seed))
        final = ep["messages"][-1]
        answered.append(ep["terminated"] and final["role"] == "assistant" and "<answer>" in final["content"])
        if answered[-1]:
            expected.add(sum(m["role"] == "tool" for m in ep["messages"]))
            own_turns += [m["content"].strip() for m in ep["messages"][:-1] if m["role"] == "assistant"]
        else:
            expected.add(len(expert_calls(tiny_source.case(seed), "oracle")))
    args = _evidence_args(tmp_path, "policy", segmenter="threshold")
    trainer = make_trainer(model, processor, dataset, args, extra_rewards=[(length_signal, 0.1)])
    batches: list[dict] = []
    real = trainer._compute_loss

    def spy(model, inputs):
        batches.append({k: inputs[k].clone() for k in ("prompt_ids", "completion_ids")})
        return real(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    assert batches
    decode = processor.tokenizer.decode
    seen, prompts = set(), []
    for batch in batches:
        for prompt, completion in zip(batch["prompt_ids"], batch["completion_ids"], strict=True):
            prompt_text, turn = decode(prompt), decode(completion)
            seen.add(prompt_text.count("<tool_response>"))
            prompts.append(prompt_text)
            assert prompt_text.rstrip().endswith("<|im_start|>assistant"), prompt_text[-200:]
            assert "<answer>" in turn and "<tool_call>" not in turn, turn
    assert seen == expected
    logged = [r for r in trainer.state.log_history if "evidence/policy_share" in r]
    assert logged and logged[0]["evidence/policy_share"] == pytest.approx(sum(answered) / len(answered))
    assert own_turns and all(any(turn in p for p in prompts) for turn in own_turns), own_turns  # its calls, verbatim
    assert 0.0 <= logged[0]["evidence/policy_correct"] <= 1.0


def test_group_prompt_log_probs_equal_trls_batched_forward(trainer_parts, tmp_path, monkeypatch):
    """With whole prompts repeated across a group's rows (answer turns after the expert's evidence), each
    prompt, pictures included, runs once: TRL's values and gradients."""

    import medgym.rl.grpo as grpo

    model, processor, dataset = trainer_parts
    args = _evidence_args(tmp_path, "expert", num_generations=2)
    trainer = grpo.make_trainer(model, processor, dataset, args)
    captured, ours = _spy_logp_pass(monkeypatch)
    grouped = []
    real_grouped = grpo.group_prompt_logps

    def spy_grouped(*args, **kwargs):
        grouped.append(args[5])  # the groups
        return real_grouped(*args, **kwargs)

    monkeypatch.setattr(grpo, "group_prompt_logps", spy_grouped)
    trainer.train()
    assert grouped and all(len(rows) == 2 for groups in grouped for rows, _ in groups), grouped
    _assert_equals_trls_pass(trainer, model, ours, captured[-1])


def test_rollout_prompts_show_the_checkpoints_own_tool_list(trainer_parts, tmp_path):
    """A checkpoint trained on the brief tool list (``brief_tools``) is prompted with it in GRPO: in the rollout
    and in the loss pass, wherever TRL renders the tool list from the env's methods."""
    from medgym.environments.contract import tool_schemas
    from medgym.rl.grpo import make_trainer

    model, processor, dataset = trainer_parts
    brief = tool_schemas(brief=True)
    trainer = make_trainer(
        model, processor, dataset, _args(tmp_path, max_steps=1, max_tool_calling_iterations=1), tools=brief
    )
    prompts: list[str] = []
    real = trainer._compute_loss

    def spy(model, inputs):
        prompts.extend(processor.tokenizer.decode(p) for p in inputs["prompt_ids"])
        return real(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    assert prompts and trainer.tools_schemas == brief
    expected = (
        processor.apply_chat_template([{"role": "system", "content": "x"}], tools=brief, tokenize=False)
        .split("<|im_end|>")[0]
        .split("# Tools")[1]
    )
    for text in prompts:
        assert expected in text and '"description"' not in text


@pytest.mark.parametrize("evidence", ["expert", "policy"])
def test_evidence_loss_pass_scores_what_the_policy_sampled_from(trainer_parts, tmp_path, evidence, monkeypatch):
    """The loss pass's log-probs of each answer equal a plain forward of that row alone (its ids and its own
    pictures): the pictures in the right places (TRL's re-rendered token types of an evidence prompt sit a few
    tokens off the ids; rebuilt from the ids, they match)."""
    from trl import GRPOTrainer

    from medgym.agents.backends import conversation_images
    from medgym.rl.grpo import make_trainer

    trl_scores = GRPOTrainer._generate_and_score_completions

    def types_off_by_three(self, inputs):  # as TRL's re-render can leave them: the same width, shifted
        out = trl_scores(self, inputs)
        out["mm_token_type_ids"] = out["mm_token_type_ids"].roll(3, dims=1)
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", types_off_by_three)
    model, processor, dataset = trainer_parts
    trainer = make_trainer(
        model, processor, dataset, _evidence_args(tmp_path, evidence), extra_rewards=[(length_signal, 0.1)]
    )
    built = _record_returns(trainer, f"_{evidence}_evidence")
    outs = _record_returns(trainer, "_generate_and_score_completions")
    trainer.train()
    rows = built[0]
    out, image_id = outs[0], model.config.image_token_id
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    assert torch.equal(out["mm_token_type_ids"].bool(), ids == image_id)
    model.eval()
    fields = {k: out.get(k) for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids", "num_images")}
    with torch.no_grad():
        batched = trainer._get_per_token_logps_and_entropies(
            model, ids, mask, out["completion_ids"].size(1), batch_size=len(rows), **fields
        )[0]
    for i, row in enumerate(rows):
        pictures = processor.image_processor(images=conversation_images(row["prompt"]), return_tensors="pt")
        completion = out["completion_ids"][i][out["completion_mask"][i].bool()]
        alone = torch.cat([out["prompt_ids"][i][out["prompt_mask"][i].bool()], completion]).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=alone, mm_token_type_ids=(alone == image_id).long(), **pictures).logits[0]
        n = len(completion)
        plain = torch.log_softmax(logits[-n - 1 : -1].float(), -1).gather(1, completion[:, None])[:, 0]
        torch.testing.assert_close(batched[i][:n], plain, atol=1e-3, rtol=1e-3)
