"""Constrained decoding: the turn grammar, its logits processor, and the shipped policy decoded under it.

The grammar is driven with token sequences of the embedded policy's own tokenizer (byte-level BPE with
``<tool_call>``-style added tokens); the processor with random logits (any model's worst case); the policy
itself on phantom cases, unconstrained and constrained.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import torch
import xgrammar as xgr

from medgym.agents.backends import EmbeddedBackend, OpenAIBackend, embedded_path
from medgym.agents.constrained import (
    TurnLimits,
    call_schema,
    constrained_logits_processor,
    tokenizer_grammars,
    turn_grammar,
)
from medgym.environments.contract import tool_schemas
from medgym.environments.parsing import ERR_EMPTY, parse_action

LIMITS = TurnLimits.for_budget(96)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_path(None))


@pytest.fixture(scope="module")
def embedded():
    return EmbeddedBackend()


@pytest.fixture(scope="module")
def tools(embedded):
    return embedded.tool_list()


def matcher(tokenizer, tools, limits: TurnLimits = LIMITS):
    return xgr.GrammarMatcher(tokenizer_grammars(tokenizer).compiled(tools, limits))


def feed(m, tokenizer, text: str) -> list[bool]:
    """Accept ``text``'s tokens one by one; whether each was accepted (stops at the first refusal)."""
    accepted = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        accepted.append(m.accept_token(token))
        if not accepted[-1]:
            break
    return accepted


def allowed(m, vocab_size: int) -> set[int]:
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    m.fill_next_token_bitmask(bitmask)
    bits = bitmask[0].numpy().view("uint32")
    return {i for i in range(vocab_size) if bits[i // 32] >> (i % 32) & 1}


# ----------------------------------------------------------------------------- the grammar, token by token


def test_the_tokenizer_is_read_as_byte_level_with_its_tags_as_single_tokens(tokenizer):
    grammars = tokenizer_grammars(tokenizer)
    assert tokenizer_grammars(tokenizer) is grammars  # cached per tokenizer
    for tag in ("<tool_call>", "</tool_call>", "<answer>", "</answer>", "<box>", "</box>"):
        (token,) = tokenizer.encode(tag, add_special_tokens=False)
        assert grammars.info.decoded_vocab[token] == tag.encode()
    assert grammars.info.decoded_vocab[tokenizer.encode(" x", add_special_tokens=False)[0]].startswith(b" ")
    assert grammars.stop_token_ids == (tokenizer.eos_token_id,)


@pytest.mark.parametrize(
    "turn",
    [
        '<tool_call>\n{"name": "segment", "arguments": {"structure": "lesion"}}\n</tool_call>',
        '<tool_call>{"name": "measure", "arguments": {"target": "mask_1", "component": 1}}</tool_call>\n'
        '<tool_call>{"name": "retrieve", "arguments": {"query": "HU range of fat"}}</tool_call>',
        "<answer>D</answer><box>[180, 115, 198, 132]</box>",
        "<answer>yes</answer>",
    ],
)
def test_well_formed_turns_are_accepted_and_may_end_only_when_complete(tokenizer, tools, turn):
    m = matcher(tokenizer, tools)
    tokens = tokenizer.encode(turn, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    for token in tokens:
        assert eos not in allowed(m, len(tokenizer)) or m.is_completed()
        assert m.accept_token(token), tokenizer.decode([token])
    assert m.is_completed() and m.accept_token(eos) and m.is_terminated()
    assert parse_action(turn).error is None


@pytest.mark.parametrize(
    ("turn", "refused_at"),
    [
        ('<tool_call>{"name": "zoomx", "arguments": {}}</tool_call>', '"zoomx"'),  # unknown tool
        ('<tool_call>{"name": "zoom", "arguments": {"boxes": "all"}}</tool_call>', '"all"'),  # string for an array
        ('<tool_call>{"name": "retrieve", "arguments": {"query": "fat", "k": "3"}}</tool_call>', '"3"'),  # for int
        ('<tool_call>{"name": "window", "arguments": {"preset": "abdomen"}}</tool_call>', '"abdomen"'),  # enum
        ('<tool_call>{"name": "zoom", "arguments": {"boxes": [[0, 0, 9, 9]], "scale": 2}}</tool_call>', "scale"),
        ('<tool_call>{"name": "retrieve", "arguments": {"k": 3}}</tool_call>', '"k"'),  # required query missing
        ('<tool_call>{"name": "measure", "arguments": {"target": "a</tool_call>"}}</tool_call>', "</tool_call>"),
        ("<answer>12 mm</answer><box>[1, 2, NaN, 4]</box>", "NaN"),
        ('<tool_call>{"name": "segment", "arguments": {"box": [1, 2, 3]}}</tool_call>', "3]"),  # 3 numbers
        ('<tool_call>{"name": "segment", "arguments": {"box": [1, 2, 3, 4, 5]}}</tool_call>', ", 5"),
        ('<tool_call>{"name": "segment", "arguments": {"point": [7]}}</tool_call>', "7]"),
        ('<tool_call>{"name": "zoom", "arguments": {"boxes": [[0, 0, 9]]}}</tool_call>', "9]"),
        ('<tool_call>{"name": "zoom", "arguments": {"boxes": []}}</tool_call>', "[]"),
        ('<answer>12</answer><tool_call>{"name": "zoom"', "<tool_call>"),  # an answer and calls in one turn
    ],
)
def test_the_grammar_refuses_what_the_parser_or_the_tools_would(tokenizer, tools, turn, refused_at):
    m = matcher(tokenizer, tools)
    accepted = feed(m, tokenizer, turn)
    assert accepted and not accepted[-1], f"{turn!r} was accepted"
    # the refusal falls inside the bad part, not before it
    prefix = tokenizer.decode(tokenizer.encode(turn, add_special_tokens=False)[: len(accepted) - 1])
    assert len(prefix) <= turn.index(refused_at) + len(refused_at) and turn.startswith(prefix)


def test_nullable_arguments_take_null_and_special_tokens_are_never_allowed(tokenizer, tools):
    full = tool_schemas()  # the full list marks optional arguments nullable (the brief one leaves that out)
    m = matcher(tokenizer, full)
    assert all(feed(m, tokenizer, '<tool_call>{"name": "measure", "arguments": {"target": "mask_1", "to": null'))
    if tools != full:  # a policy prompted without "nullable" is held to what it was shown
        m = matcher(tokenizer, tools)
        assert not all(feed(m, tokenizer, '<tool_call>{"name": "measure", "arguments": {"to": null'))
    m = matcher(tokenizer, tools)
    assert all(feed(m, tokenizer, '<tool_call>{"name": "retrieve", "arguments": {"query": "'))
    inside_a_string = allowed(m, len(tokenizer))
    specials = set(tokenizer.all_special_ids)
    assert inside_a_string and not inside_a_string & specials


def test_free_text_is_bounded(tokenizer, tools):
    limits = TurnLimits(thought_chars=5, answer_chars=8)
    m = matcher(tokenizer, tools, limits)
    assert m.accept_string("abcde") and not m.accept_string("f")
    m = matcher(tokenizer, tools, limits)
    assert m.accept_string("<answer>12345678") and not m.accept_string("9")
    assert m.accept_string("</answer>") and m.is_completed()


def test_a_call_whose_strings_never_close_still_ends_within_the_embedded_budget(tokenizer, tools):
    """At the embedded backend's turn budget, a string argument is closed by the grammar early enough that the
    whole call, written one character per token, still fits: a policy that keeps writing syllables into a
    string (as a drifting GRPO policy did into ``structure``) gets its call run, not a format error."""
    from medgym.agents.backends import EMBEDDED_MAX_NEW_TOKENS

    limits = TurnLimits.for_budget(EMBEDDED_MAX_NEW_TOKENS)
    longest_query = "tumour response category from change in longest diameter"  # the expert's longest string
    assert len(longest_query) <= limits.string_chars < 200
    for name, head in (("retrieve", '"query": "'), ("segment", '"box": [-1000, -1000, -1000, -1000], "structure": "')):
        if name not in {t["function"]["name"] for t in tools}:
            continue
        opening = f'<tool_call>\n{{"name": "{name}", "arguments": {{{head}'
        m = matcher(tokenizer, tools, limits)
        assert all(feed(m, tokenizer, opening))
        written = 0
        while m.accept_string("a"):
            written += 1
        assert written == limits.string_chars  # the grammar refuses one more character
        assert all(feed(m, tokenizer, '"}}\n</tool_call>')) and m.is_completed()
        worst = len(tokenizer.encode(opening, add_special_tokens=False)) + written + 8  # one token a character
        assert worst <= EMBEDDED_MAX_NEW_TOKENS, (name, worst)


@pytest.mark.parametrize("max_calls", [0, 1, 2])
def test_a_turn_holds_at_most_max_calls_calls(tokenizer, tools, embedded, max_calls):
    """``max_calls`` bounds the calls of a turn (0: any number); the embedded policy, trained on one call a
    turn, is decoded with one, so it cannot open a second call that its turn budget then cuts."""
    call = '<tool_call>\n{"name": "retrieve", "arguments": {"query": "nodule"}}\n</tool_call>'
    m = matcher(tokenizer, tools, TurnLimits(max_calls=max_calls))
    written = 0
    while written < 3 and all(feed(m, tokenizer, ("\n" if written else "") + call)):
        written += 1
        assert m.is_completed()  # the turn may end after any of them
    assert written == (max_calls or 3)
    assert embedded.turn_limits.max_calls == 1


def test_turn_grammar_is_ebnf_that_compiles_again_and_call_schemas_name_one_tool(tools):
    text = turn_grammar(tools, LIMITS)
    assert "root" in text and "measure" in text
    xgr.Grammar.from_ebnf(text)  # endpoints (vLLM) read this text
    schema = call_schema(tools[0])
    assert schema["properties"]["name"] == {"const": tools[0]["function"]["name"]}
    assert schema["required"] == ["name", "arguments"]


# ----------------------------------------------------------------------------- the processor, any logits


def decode_random(tokenizer, tools, seeds: list[int], max_new_tokens: int) -> list[tuple[str, bool]]:
    """Greedy decoding of random logits under the processor, one row per seed (a batch): texts, and whether
    each ended where the grammar may end (False: the budget cut it mid-turn)."""
    vocab = len(tokenizer)
    processor = constrained_logits_processor(tokenizer, tools, limits=LIMITS, max_new_tokens=max_new_tokens)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    ids = torch.zeros((len(seeds), 3), dtype=torch.long)  # a "prompt"
    done = [False] * len(seeds)
    eos = tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        scores = torch.stack([torch.randn(vocab, generator=g) * 3 for g in generators])
        scores = processor(ids, scores)
        nxt = scores.argmax(-1)
        nxt = torch.where(torch.tensor(done), torch.tensor(tokenizer.pad_token_id), nxt)  # as generate pads
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done = [d or t == eos for d, t in zip(done, nxt.tolist(), strict=True)]
        if all(done):
            break
    processor(ids, scores)  # the processor takes in the last tokens, as at generate's next step
    texts = []
    for row in range(len(seeds)):
        new = [t for t in ids[row, 3:].tolist() if t not in (eos, tokenizer.pad_token_id)]
        texts.append((tokenizer.decode(new), processor.completed(row)))
    return texts


def test_any_logits_give_a_turn_that_parses_or_a_format_error_when_the_budget_cuts_it(tokenizer, tools):
    """The worst model: random logits. Batched, one matcher per row; never a hang, never a half turn that parses."""
    finished = cut = 0
    # Budgets 9, 15 and 30 cut these rows right after a complete unit, inside the next tag ("<b", "<tool_c"):
    # without the processor's end-of-budget rule those half tags would parse.
    for budget, rows in ((9, 16), (15, 16), (30, 16), (96, 8)):
        for text, ended in decode_random(tokenizer, tools, list(range(rows)), budget):
            action = parse_action(text)
            if ended:
                finished += 1
                assert action.error is None, text
                for call in action.calls:
                    schema = next(t for t in tools if t["function"]["name"] == call["name"])
                    validate(call["arguments"], schema["function"]["parameters"])
            else:
                cut += 1
                assert action.error is not None, f"a turn cut by the budget parsed: {text!r}"
    assert finished and cut  # both paths were exercised


def test_a_processor_reused_for_a_second_generation_starts_afresh(tokenizer, tools):
    processor = constrained_logits_processor(tokenizer, tools, limits=LIMITS)
    vocab = len(tokenizer)
    answer = tokenizer.encode("<answer>", add_special_tokens=False)[0]
    for prompt_length in (4, 7):  # a new prompt: the previous generation's state is dropped
        ids = torch.zeros((1, prompt_length), dtype=torch.long)
        scores = processor(ids, torch.zeros((1, vocab)))
        assert torch.isfinite(scores[0, answer])
        ids = torch.cat([ids, torch.tensor([[answer]])], dim=1)
        scores = processor(ids, torch.zeros((1, vocab)))
        assert not torch.isfinite(scores[0, tokenizer.eos_token_id])  # inside <answer>: no end yet


# ----------------------------------------------------------------------------- the shipped policy


def validate(value: Any, schema: dict[str, Any]) -> None:
    """The subset of JSON Schema the tool schemas use (types, enums, items, required, nullable), strictly."""
    if value is None:
        assert schema.get("nullable") or schema.get("type") == "null", schema
        return
    kind = schema.get("type")
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    if kind is not None:
        assert checks[kind](value), (value, schema)
    if "enum" in schema:
        assert value in schema["enum"]
    if kind == "array":
        for item in value:
            validate(item, schema.get("items", {}))
    if kind == "object":
        properties = schema.get("properties", {})
        assert set(value) <= set(properties), f"unknown arguments {set(value) - set(properties)}"
        assert set(schema.get("required", [])) <= set(value)
        for key, item in value.items():
            validate(item, properties[key])


class Recorded:
    """A policy wrapper that keeps every turn and how long it took."""

    def __init__(self, policy):
        self.policy, self.model_id = policy, policy.model_id
        self.turns: list[str] = []
        self.seconds = 0.0

    def next_turn(self, messages, *, temperature: float = 0.0) -> str:
        start = time.perf_counter()
        turn = self.policy.next_turn(messages, temperature=temperature)
        self.seconds += time.perf_counter() - start
        self.turns.append(turn)
        return turn


def first_turn_messages(seed: int, tool_mode: str = "oracle"):
    import gymnasium as gym

    from medgym import ENV_ID
    from medgym.environments.contract import question_messages

    env = gym.make(ENV_ID, source="phantom", tool_mode=tool_mode, segmenter="threshold")
    env.reset(seed=seed, options={"case_seed": seed})
    base = env.unwrapped
    messages = question_messages(base.question_text(), base.question_images(), base.tool_mode)
    env.close()
    return messages


def test_the_shipped_policy_decodes_the_same_first_turn_constrained(embedded, tools):
    messages = first_turn_messages(1)
    try:
        free = embedded.next_turn(messages)
        embedded.constrained = True
        constrained = embedded.next_turn(messages)
    finally:
        embedded.constrained = False
    action = parse_action(constrained)
    assert action.error is None
    for call in action.calls:
        validate(
            call["arguments"], next(t for t in tools if t["function"]["name"] == call["name"])["function"]["parameters"]
        )
    if parse_action(free).error is None:  # a well-formed greedy turn is already in the grammar: unchanged
        assert constrained == free


def test_a_budget_cut_mid_turn_is_a_format_error_not_a_hang(embedded):
    messages = first_turn_messages(1)
    saved = embedded.max_new_tokens
    try:
        embedded.constrained, embedded.max_new_tokens = True, 4
        start = time.perf_counter()
        text = embedded.next_turn(messages)
    finally:
        embedded.constrained, embedded.max_new_tokens = False, saved
    assert time.perf_counter() - start < 60
    assert text.startswith("<") and parse_action(text).error is not None
    assert parse_action(text).error != ERR_EMPTY or not text


@pytest.mark.slow
def test_every_constrained_turn_of_the_shipped_policy_parses_on_phantom_cases(embedded, tools):
    import gymnasium as gym

    from medgym import ENV_ID
    from medgym.environments.evaluate import run_episode

    results = {}
    for constrained in (False, True):
        embedded.constrained = constrained
        policy = Recorded(embedded)
        env = gym.make(ENV_ID, source="phantom", tool_mode="oracle", segmenter="threshold")
        try:
            episodes = [run_episode(env, policy, seed) for seed in range(5)]
        finally:
            env.close()
            embedded.constrained = False
        results[constrained] = (policy, episodes)
    policy, episodes = results[True]
    assert sum(e["format_errors"] for e in episodes) == 0
    for turn in policy.turns:
        action = parse_action(turn)
        assert action.error is None, turn
        for call in action.calls:
            schema = next(t for t in tools if t["function"]["name"] == call["name"])
            validate(call["arguments"], schema["function"]["parameters"])
    free_policy, free_episodes = results[False]
    assert sum(e["format_errors"] for e in episodes) <= sum(e["format_errors"] for e in free_episodes)


# ----------------------------------------------------------------------------- endpoints


class FakeCompletions:
    def __init__(self):
        self.requests: list[dict[str, Any]] = []

    def create(self, **request):
        from types import SimpleNamespace

        self.requests.append(request)
        message = SimpleNamespace(content="<answer>yes</answer>", tool_calls=None)
        return SimpleNamespace(choices=[SimpleNamespace(message=message)])


def test_the_openai_backend_sends_tool_choice_and_the_grammar_only_when_constrained():
    from types import SimpleNamespace

    completions = FakeCompletions()
    client = SimpleNamespace(chat=SimpleNamespace(completions=completions))
    messages = [{"role": "user", "content": "q", "images": []}]
    for constrained in (False, True):
        OpenAIBackend("m", client=client, constrained=constrained).next_turn(messages)
    plain, guided = completions.requests
    assert plain["tool_choice"] == guided["tool_choice"] == "auto"
    assert plain["tools"] == tool_schemas() and "extra_body" not in plain
    grammar = guided["extra_body"]["structured_outputs"]["grammar"]
    assert grammar == turn_grammar(tool_schemas(), TurnLimits.for_budget(1024))
    json.dumps(guided["extra_body"])  # sent as JSON
