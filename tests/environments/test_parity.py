"""One model-facing contract: the env, the agent graph and the TRL bridge prompt a model byte for byte alike,
and medgym's parser agrees with TRL's tool-call parser."""

from __future__ import annotations

import json
import random

import gymnasium as gym
import pytest

from medgym import EMBEDDED_POLICY_DIR, ENV_ID
from medgym.environments.contract import question_messages, tool_schemas
from medgym.environments.parsing import parse_action
from medgym.environments.sources import PhantomSource

pytestmark = pytest.mark.skipif(not (EMBEDDED_POLICY_DIR / "config.json").is_file(), reason="shipped policy needed")


@pytest.fixture(scope="module")
def backend():
    from medgym.agents.backends import EmbeddedBackend

    backend = EmbeddedBackend()
    # The contract's tools, as the TRL bridge shows them (a checkpoint's own recorded tools, which its
    # backend uses for a policy trained on older schemas, are tested in tests/agents/test_embedded_chat.py).
    backend.schemas = None
    return backend


@pytest.mark.parametrize("seed", [3, 8])
def test_env_graph_and_bridge_render_the_same_prompt(backend, seed, tmp_path):
    from medgym.agents.graph import AgentContext
    from medgym.agents.session import ChatAgent
    from medgym.rl.bridge import MedGymToolEnv
    from medgym.rl.conversation import multimodal_prompt

    # env: what medgym eval shows a policy
    env = gym.make(ENV_ID, segmenter="threshold")
    env.reset(seed=seed, options={"case_seed": seed})
    base = env.unwrapped
    env_prompt = backend.render(question_messages(base.question_text(), base.question_images(), base.tool_mode))
    # graph: what the chat shows it (a policy that records its input, then answers)
    seen = []

    class Recorder:
        model_id = "recorder"

        def next_turn(self, messages, *, temperature=0.0):
            seen.append(messages)
            return "<answer>no</answer>"

    with ChatAgent(tmp_path / "c.sqlite", AgentContext(backend=Recorder(), data_dir=str(tmp_path))) as agent:
        agent.run("t", "", {"kind": "phantom", "seed": seed})
    graph_prompt = backend.render(seen[0])
    # bridge: what GRPO / SFT show it (TRL's dataset row layout, the methods' tools)
    case = PhantomSource().case(seed)
    conv = multimodal_prompt(case, base.tool_mode, system=backend.system_prompt)
    trl_tools = [getattr(MedGymToolEnv, t["function"]["name"]) for t in tool_schemas()]
    from transformers.utils import get_json_schema

    assert [get_json_schema(f) for f in trl_tools] == tool_schemas()
    bridge_prompt = backend.processor.apply_chat_template(
        conv, tools=tool_schemas(), add_generation_prompt=True, tokenize=False
    )
    assert env_prompt == graph_prompt == bridge_prompt
    assert env_prompt.count('"name": "zoom"') == 1 and backend.system_prompt in env_prompt  # tools once


def _corpus(n: int = 240) -> list[str]:
    rng = random.Random(0)
    calls = [
        {"name": "zoom", "arguments": {"boxes": [[10, 12, 80, 90]]}},
        {"name": "segment", "arguments": {"box": [40, 41, 90, 95]}},
        {"name": "measure", "arguments": {"target": "mask_1", "component": 1}},
        {"name": "window", "arguments": {"preset": "lung"}},
        {"name": "retrieve", "arguments": {"query": "nodule follow-up"}},
    ]
    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            out.append(f"<tool_call>\n{json.dumps(rng.choice(calls))}\n</tool_call>")
        elif kind == 1:  # several calls in one turn
            k = rng.randint(2, 3)
            out.append("".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in rng.sample(calls, k)))
        elif kind == 2:  # thoughts first
            out.append(f"Let me look closer.\n<tool_call>\n{json.dumps(rng.choice(calls))}\n</tool_call>")
        elif kind == 3:  # broken JSON
            text = json.dumps(rng.choice(calls))
            out.append(f"<tool_call>\n{text[: rng.randint(3, len(text) - 2)]}\n</tool_call>")
        elif kind == 4:  # an answer
            out.append(rng.choice(["<answer>yes</answer>", "<answer>12.5</answer><box>[1, 2, 30, 40]</box>"]))
        else:  # not JSON at all, or no name
            out.append(
                rng.choice(["<tool_call>\nzoom please\n</tool_call>", '<tool_call>\n{"arguments": {}}\n</tool_call>'])
            )
    return out


def test_parse_action_agrees_with_trls_tool_call_parser(backend):
    from trl.chat_template_utils import add_response_schema, parse_response

    tokenizer = add_response_schema(backend.processor.tokenizer)
    corpus = _corpus()
    assert len(corpus) >= 200
    agree = 0
    for text in corpus:
        ours = parse_action(text)
        ids = tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
        theirs = parse_response(tokenizer, ids, prefix=[], tools=tool_schemas())  # as GRPO calls it
        trl_calls = [
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in theirs.get("tool_calls") or []
        ]
        if ours.error is None and ours.calls:
            assert trl_calls == [{"name": c["name"], "arguments": c["arguments"]} for c in ours.calls], text
        else:  # answers and malformed calls: TRL finds no valid call either
            assert not trl_calls or ours.error is not None, text
            if ours.error is not None:
                assert not trl_calls, (text, trl_calls)
        agree += 1
    assert agree == len(corpus)
