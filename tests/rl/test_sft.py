"""SFT: expert conversations with tool turns and tool images; a short run makes the model call tools."""

from __future__ import annotations


def test_expert_conversation_layout(tiny_source):
    from medgym.environments.expert import expert_calls
    from medgym.rl.conversation import SCALE_NOTE, expert_conversation

    case = tiny_source.case(2000)
    expert = expert_calls(case, "predicted")
    messages, n_images = expert_conversation(case)
    roles = [m["role"] for m in messages]
    assert roles[:2] == ["system", "user"]
    assert roles[2:] == ["assistant", "tool"] * len(expert) + ["assistant"]
    assert (
        "downscaled" in messages[0]["content"][0]["text"]
        and SCALE_NOTE.split("{")[0] in messages[0]["content"][0]["text"]
    )
    calls = [m["tool_calls"][0]["function"] for m in messages if m.get("tool_calls")]
    assert [c["name"] for c in calls] == [c.name for c in expert]
    tool_texts = [p["text"] for m in messages if m["role"] == "tool" for p in m["content"] if p["type"] == "text"]
    assert all(t.startswith(f"[{c['name']}] ") for t, c in zip(tool_texts, calls, strict=True))
    assert messages[-1]["content"][0]["text"].startswith("<answer>")  # predicted: read off the tool results
    assert n_images >= 1 + any(c.name == "segment" for c in expert)
    oracle, _ = expert_conversation(case, tool_mode="oracle")
    assert oracle[-1]["content"][0]["text"] == case.expert_answer


def test_assistant_mask_covers_calls_answer_and_stop(tiny_processor, tiny_source):
    from medgym.environments.contract import tool_schemas
    from medgym.environments.expert import expert_calls
    from medgym.rl.conversation import expert_conversation
    from medgym.rl.sft import encode_conversation

    case = tiny_source.case(2001)
    n_calls = len(expert_calls(case, "predicted"))
    messages, _ = expert_conversation(case)
    enc = encode_conversation(tiny_processor, messages, tool_schemas())
    labels = enc["labels"][0]
    target = tiny_processor.tokenizer.decode(labels[labels != -100])
    assert target.count("<|im_end|>") == n_calls + 1
    assert target.count("<tool_call>") == n_calls
    assert messages[-1]["content"][0]["text"] in target
    assert "[segment]" not in target and "You are" not in target  # tool results and prompts are not trained on
    image_pad = tiny_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == image_pad).sum()) == 16 * enc["image_grid_thw"].shape[0]


def test_first_turns_train_only_the_first_move(tiny_processor, tiny_source):
    from medgym.environments.expert import expert_calls
    from medgym.rl.sft import ConversationDataset

    cases = [tiny_source.case(2002)]
    first = expert_calls(cases[0], "predicted")[0]
    data = ConversationDataset(cases, tiny_processor, turns=1)
    enc = data[0]
    target = tiny_processor.tokenizer.decode(enc["labels"][0][enc["labels"][0] != -100])
    assert target.count("<tool_call>") == 1 and "<answer>" not in target
    assert f'"{first.name}"' in target
    assert data.env.calls == []  # the first move is the label: no tool ran for it
    whole = ConversationDataset(cases, tiny_processor)[0]
    assert whole["input_ids"].shape[1] > enc["input_ids"].shape[1]


def test_short_sft_makes_greedy_output_a_valid_tool_call(tiny_sft, tiny_tool_mode):
    from medgym.agents.backends import EmbeddedBackend
    from medgym.environments.contract import case_messages
    from medgym.environments.parsing import parse_action
    from medgym.tools import TOOLS

    folder, cases, losses = tiny_sft
    assert losses[-1] < losses[0] / 3
    policy = EmbeddedBackend(folder, max_new_tokens=40)  # the runtime that loads what training saved
    ok = 0
    for case in cases[:4]:
        action = parse_action(policy.next_turn(case_messages(case, tiny_tool_mode)))
        ok += bool(action.error is None and action.calls and action.calls[0]["name"] in TOOLS)
    assert ok >= 3


def test_random_model_does_not_call_tools(tiny_init, tiny_source):
    """The baseline SFT is measured against: an untrained model never emits a valid call."""
    from medgym.agents.backends import EmbeddedBackend
    from medgym.environments.contract import case_messages
    from medgym.environments.parsing import parse_action

    text = EmbeddedBackend(tiny_init, max_new_tokens=24).next_turn(case_messages(tiny_source.case(2000)))
    assert not parse_action(text).calls


def test_shared_prefix_loss_equals_the_full_forward_in_loss_and_gradients(tiny_processor, tiny_source):
    import torch

    from medgym.environments.contract import tool_schemas
    from medgym.rl.conversation import expert_conversation
    from medgym.rl.policy_model import build_model
    from medgym.rl.sft import encode_conversation, shared_prefix_length, shared_prefix_loss

    model = build_model(tiny_processor, "tiny", seed=3)
    group = [
        encode_conversation(tiny_processor, expert_conversation(tiny_source.case(s))[0], tool_schemas())
        for s in (2040, 2041, 2042)
    ]
    start = tiny_processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    prefix = shared_prefix_length(group, start)
    shared = tiny_processor.tokenizer.decode(group[0]["input_ids"][0, :prefix])
    assert shared.rstrip().endswith("<|im_end|>") and "</tools>" in shared  # the system turn, tool list included
    assert int(group[0]["input_ids"][0, prefix]) == start

    def loss_and_grads(n: int):
        model.zero_grad()
        loss = shared_prefix_loss(model, group, n)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full_loss, full_grads = loss_and_grads(0)
    shared_loss, shared_grads = loss_and_grads(prefix)
    assert abs(full_loss - shared_loss) < 1e-5 * max(1.0, full_loss)
    assert len(full_grads) == len(shared_grads)
    for a, b in zip(full_grads, shared_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # A labelled token inside the would-be prefix forbids sharing it.
    broken = [dict(ex) for ex in group]
    broken[1]["labels"] = broken[1]["labels"].clone()
    broken[1]["labels"][0, 5] = 7
    assert shared_prefix_length(broken, start) == 0


def test_answer_weight_weighs_the_answer_turn_in_both_loss_paths(tiny_processor, tiny_source):
    import torch

    from medgym.environments.contract import tool_schemas
    from medgym.rl.conversation import expert_conversation
    from medgym.rl.policy_model import build_model
    from medgym.rl.sft import answer_weights, encode_conversation, shared_prefix_length, shared_prefix_loss

    model = build_model(tiny_processor, "tiny", seed=4)
    group = [
        encode_conversation(tiny_processor, expert_conversation(tiny_source.case(s))[0], tool_schemas())
        for s in (2050, 2051)
    ]
    labels = group[0]["labels"]
    weights = answer_weights(labels, 5.0)
    heavy = tiny_processor.tokenizer.decode(labels[0][weights[0] == 5.0])
    assert heavy.startswith("<answer>") and heavy.count("<|im_end|>") == 1  # the last turn only, its stop included
    assert int((weights[0] == 1.0).sum()) == int((labels[0] != -100).sum()) - int((weights[0] == 5.0).sum())
    prefix = shared_prefix_length(group, tiny_processor.tokenizer.convert_tokens_to_ids("<|im_start|>"))
    assert prefix > 0
    with torch.no_grad():
        plain = shared_prefix_loss(model, group, 0).item()
        same = shared_prefix_loss(model, group, 0, answer_weight=1.0 + 1e-9).item()  # the weighted code path
        full = shared_prefix_loss(model, group, 0, answer_weight=5.0).item()
        shared = shared_prefix_loss(model, group, prefix, answer_weight=5.0).item()
        # The answer tokens' own mean loss, from a forward with only them labelled.
        answer_only = []
        for ex in group:
            w = answer_weights(ex["labels"], 5.0)
            only = dict(ex, labels=torch.where(w == 5.0, ex["labels"], torch.full_like(ex["labels"], -100)))
            answer_only.append(model(**only).loss.item())
    assert abs(plain - same) < 1e-4 * plain
    assert abs(full - shared) < 1e-4 * full  # the prefix path weighs the same tokens
    answer_mean = sum(answer_only) / len(answer_only)
    assert abs(full - answer_mean) < abs(plain - answer_mean)  # weighted toward the answer's loss


def test_counterfactual_answers_swap_the_printed_number_in_result_and_answer(tiny_processor):
    import re

    from medgym.environments.sources import PhantomSource
    from medgym.rl.conversation import expert_conversation
    from medgym.rl.sft import ConversationDataset

    cases = [PhantomSource(templates=["lesion_area"]).case(s) for s in (3, 4)]
    plain = ConversationDataset(cases, tiny_processor)
    swapped = ConversationDataset(cases, tiny_processor, counterfactual=1.0)
    changed = 0
    for i, case in enumerate(cases):
        messages, _ = expert_conversation(case)
        truth = re.search(r"<answer>(.*?)</answer>", messages[-1]["content"][0]["text"]).group(1)
        a = tiny_processor.tokenizer.decode(plain[i]["input_ids"][0])
        b = tiny_processor.tokenizer.decode(swapped[i]["input_ids"][0])
        new = re.findall(r"<answer>(.*?)</answer>", b)[-1]
        assert re.findall(r"<answer>(.*?)</answer>", a)[-1] == truth
        if new != truth:
            changed += 1
            measured = b.split("[measure]")[-1]
            assert f"area {new} mm2" in measured and f"area {truth} mm2" not in b  # every result that printed it
            assert b.replace(new, truth) == a  # nothing else moved
    assert changed == len(cases)


def test_kept_conversations_are_built_once_and_swapped_afresh_per_draw(tiny_processor, monkeypatch):
    """``keep``: the tools run once per case; with counterfactuals, each draw swaps its own number (new
    copying examples every epoch), while the unswapped conversation stays as built."""
    import re

    import medgym.rl.sft as sft
    from medgym.environments.sources import PhantomSource

    built = []
    real = sft.expert_conversation
    monkeypatch.setattr(sft, "expert_conversation", lambda *a, **k: built.append(a[0].seed) or real(*a, **k))
    cases = [PhantomSource(templates=["lesion_area"]).case(s) for s in (3, 4)]
    data = sft.ConversationDataset(cases, tiny_processor, counterfactual=1.0, keep=True)
    answers = [
        [
            re.findall(r"<answer>(.*?)</answer>", tiny_processor.tokenizer.decode(data[i]["input_ids"][0]))[-1]
            for i in (0, 1)
        ]
        for _ in range(4)
    ]
    assert sorted(built) == sorted(c.seed for c in cases)  # 8 draws, 2 builds
    assert all(len({a[i] for a in answers}) >= 3 for i in (0, 1)), answers  # fresh swaps per draw
    kept = data.kept[0][-1]["content"][0]["text"]
    assert (
        re.search(r"<answer>(.*?)</answer>", kept).group(1)
        == real(cases[0])[0][-1]["content"][0]["text"][8:].split("<")[0]
    )


def test_brief_tool_list_renders_the_same_tools_in_a_third_of_the_text(tiny_processor, tiny_source):
    from medgym.environments.contract import tool_schemas
    from medgym.rl.conversation import expert_conversation
    from medgym.rl.sft import encode_conversation

    messages, _ = expert_conversation(tiny_source.case(2000))
    full = encode_conversation(tiny_processor, messages, tool_schemas())["input_ids"][0]
    brief = encode_conversation(tiny_processor, messages, tool_schemas(brief=True))["input_ids"][0]
    text = tiny_processor.tokenizer.decode(brief)
    assert all(f'"name": "{s["function"]["name"]}"' in text for s in tool_schemas())
    assert '"description"' not in text and '"enum": ["current", "prior"]' in text
    full_text = tiny_processor.tokenizer.decode(full)
    assert len(brief) < len(full)
    # the system turn in a third of the text (the shipped tokenizer: ~410 tokens instead of ~1,350)
    assert 2.5 * len(text.split("<|im_start|>user")[0]) < len(full_text.split("<|im_start|>user")[0])
    assert full_text.split("<|im_start|>user")[1] == text.split("<|im_start|>user")[1]  # the conversation as it was


def test_direct_conversation_trains_only_the_answer(tiny_processor, tiny_source):
    from medgym.rl.sft import direct_conversation, encode_conversation

    case = tiny_source.case(2043)
    enc = encode_conversation(tiny_processor, direct_conversation(case), None)
    labels = enc["labels"][0]
    target = tiny_processor.tokenizer.decode(labels[labels != -100])
    assert target.strip() == case.expert_answer + "<|im_end|>"
    prompt = tiny_processor.tokenizer.decode(enc["input_ids"][0])
    assert "<tools>" not in prompt and "[segment]" not in prompt  # no tool list, no tool turns
