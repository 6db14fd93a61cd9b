"""The step budget's last turn: the loop says so, and a constrained backend can then only answer."""

from __future__ import annotations

from medgym.agents.backends import EmbeddedBackend, ScriptedBackend
from medgym.agents.graph import AgentContext
from medgym.agents.session import ChatAgent
from medgym.environments.contract import LAST_TURN_KIND, NOTE_LAST_TURN, question_images, question_text
from medgym.environments.parsing import parse_action
from medgym.environments.sources import PhantomSource

ZOOM = '<tool_call>{"name": "zoom", "arguments": {"box": [0, 0, 64, 64]}}</tool_call>'


def test_only_the_last_turn_of_the_budget_carries_the_note(tmp_path):
    backend = ScriptedBackend([ZOOM])
    with ChatAgent(tmp_path / "c.sqlite", AgentContext(backend=backend, data_dir=str(tmp_path), max_steps=3)) as agent:
        agent.run("t", "Loop", {"kind": "phantom", "seed": 3})
    kinds = [call[-1].get("kind") for call in backend.calls]
    assert len(kinds) == 3
    assert kinds[-1] == LAST_TURN_KIND and backend.calls[-1][-1]["content"] == NOTE_LAST_TURN
    assert LAST_TURN_KIND not in kinds[:-1]


def test_a_constrained_backend_answers_on_the_last_turn():
    case = PhantomSource().case(3)
    messages = [
        {"role": "system", "content": "", "images": []},
        {"role": "user", "content": question_text(case, "predicted"), "images": question_images(case)},
    ]
    policy = EmbeddedBackend(constrained=True)
    free = parse_action(policy.next_turn(messages))
    assert free.error is None and free.calls  # the shipped policy starts by calling a tool
    last = [*messages, {"role": "user", "content": NOTE_LAST_TURN, "images": [], "kind": LAST_TURN_KIND}]
    action = parse_action(policy.next_turn(last))
    assert action.error is None and not action.calls and action.answer is not None
