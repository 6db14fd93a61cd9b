"""The one policy protocol, and the expert that follows a case's expert trace.

A policy writes the next model turn from the conversation so far::

    model_id: str
    next_turn(messages, *, temperature=0.0) -> str

``messages`` are the contract's dicts (:mod:`medgym.environments.contract`): system prompt,
the question with its pictures, assistant turns, ``tool`` turns with the tools' text and
pictures. ``medgym eval``, the agent graph (chat, web, LangGraph server), ``medgym serve`` and
training all drive policies through this one method; the specs that name them
(``expert``, ``embedded[:PATH]``, ``transformers:PATH``, ``openai:MODEL@URL``) are parsed by
:func:`medgym.agents.backends.make_policy`.

A policy that depends on the case (the expert) has ``for_case(case) -> Policy``;
:func:`bind_case` calls it where a runtime starts an episode on a known case.
"""

from __future__ import annotations

import collections
import copy
import json
import statistics
from typing import Any, Protocol, runtime_checkable

from medgym.environments.case import Case, box_text
from medgym.environments.contract import DEFAULT_TOOL_MODE, Message, check_tool_mode

ERR_EXPERT_NO_CASE = (
    "The expert follows a case's expert trace, and uploaded images have none. "
    "Chat over a phantom case (--case-seed N), or use --backend demo for a scripted demo on any image."
)


ERR_PRIOR_NO_CASE = (
    "The answer prior answers a known question template (a benchmark case); it has no answer for an "
    "uploaded image. Evaluate it with medgym eval --policy prior or medgym train bench --checkpoint prior=prior."
)
PRIOR_FIRST_SEED = 90_000  # the cases the prior is fitted on (held-out evaluation uses seeds 0..999)


@runtime_checkable
class Policy(Protocol):
    """What writes a model turn (see the module docstring)."""

    model_id: str

    def next_turn(self, messages: list[Message], *, temperature: float = 0.0) -> str: ...


def bind_case(policy: Any, case: Case | None) -> Policy:
    """The policy to use on ``case``: ``policy.for_case(case)`` where it has one, else the policy itself."""
    for_case = getattr(policy, "for_case", None)
    return for_case(case) if callable(for_case) else policy


def turn_index(messages: list[Message]) -> int:
    """How many assistant turns the current question has had (messages after the last question)."""
    k = 0
    for m in reversed(messages):
        if m["role"] == "assistant":
            k += 1
        elif m["role"] == "user" and (m.get("kind") == "question" or m.get("images")):
            break
    return k


def tool_records(messages: list[Message]) -> list[dict[str, Any]]:
    """The tool results of the current question, in call order, as ``{"name", "arguments", "text", "data", "error"}``."""
    out: list[dict[str, Any]] = []
    for m in reversed(messages):
        if m["role"] == "user" and m.get("kind") == "question":
            break
        if m["role"] == "tool":
            out.append(
                {
                    "name": m.get("name"),
                    "arguments": m.get("arguments") or {},
                    "text": m.get("text", m["content"]),
                    "data": m.get("data") or {},
                    "error": bool(m.get("error")),
                }
            )
    return out[::-1]


class ExpertPolicy:
    """Follows a case's expert trace: its calls one per turn, then its answer.

    In ``predicted`` mode the calls are the annotator's (a prompt box around the finding, then
    the real segmenter and measurements of *its* mask) and the answer is computed from the tool
    results it read; in ``oracle`` mode the calls name ground-truth structures and the answer is
    the known one. Stateless: the turn to give is read from the conversation, so a resumed chat
    goes on where it was. Without a case it is a template: :meth:`for_case` binds one.
    """

    def __init__(self, case: Case | None = None, tool_mode: str = DEFAULT_TOOL_MODE):
        self.case = case
        self.tool_mode = check_tool_mode(tool_mode)
        self.model_id = "expert"
        self.calls: list[str] = []
        if case is not None:
            from medgym.environments.expert import expert_turns

            self.calls = expert_turns(case, self.tool_mode)

    def for_case(self, case: Case | None) -> ExpertPolicy:
        if case is None:
            raise ValueError(ERR_EXPERT_NO_CASE)
        return ExpertPolicy(case, self.tool_mode)

    def next_turn(self, messages: list[Message], *, temperature: float = 0.0) -> str:
        if self.case is None:
            raise ValueError(ERR_EXPERT_NO_CASE)
        k = turn_index(messages)
        if k < len(self.calls):
            return self.calls[k]
        from medgym.environments.expert import expert_answer

        return expert_answer(self.case, self.tool_mode, tool_records(messages))


def message_json(messages: list[Message]) -> str:
    """A stable text of messages without pixels (image shapes only), for hashing and parity tests."""

    def strip(m: Message) -> dict[str, Any]:
        return {**{k: v for k, v in m.items() if k != "images"}, "images": [list(i.shape) for i in m.get("images", [])]}

    return json.dumps([strip(m) for m in messages], sort_keys=True, default=str)


def typical_answer(cases: list[Case]) -> str:
    """The answer turn a question-only baseline gives for cases of one template: the most common
    answer, or the median for numbers and boxes.

    >>> mc = [Case.__new__(Case) for _ in range(3)]
    >>> for c, a in zip(mc, "ABB"):
    ...     c.answer, c.answer_type, c.answer_box = a, "mc", None
    >>> typical_answer(mc)
    '<answer>B</answer>'
    """
    kind = cases[0].answer_type
    if kind == "box" and all(c.answer_box is not None for c in cases):
        box = box_text([statistics.median(c.answer_box[i] for c in cases) for i in range(4)])
        return f"<answer>{box}</answer><box>{box}</box>"
    if kind == "numeric":
        return f"<answer>{statistics.median(float(c.answer) for c in cases):g}</answer>"
    return f"<answer>{collections.Counter(c.answer for c in cases).most_common(1)[0][0]}</answer>"


class AnswerPriorPolicy:
    """A baseline, not a model: per question template, the answer most common among ``n`` training cases
    (the median for numbers and boxes, :func:`typical_answer`), whatever the picture shows, with no tool
    call. What answer rewards can teach a policy that does not look; one that looks must beat it.

    The template is what the question asks (its wording says as much); the prior reads it from the
    case it is bound to (:meth:`for_case`), and nothing else of the case.
    """

    def __init__(self, source: str = "phantom", n: int = 1000, first: int = PRIOR_FIRST_SEED):
        from medgym.environments.sources import make_source

        if n < 1:
            raise ValueError("the answer prior needs at least one case to fit on")
        fitted = make_source(source)
        by_template: dict[str, list[Case]] = collections.defaultdict(list)
        for seed in range(first, first + n):
            case = fitted.case(seed)
            by_template[case.template].append(case)
        self.answers = {t: typical_answer(cases) for t, cases in by_template.items()}
        self.model_id = f"answer-prior({source}, {n} cases)"
        self.case: Case | None = None

    def for_case(self, case: Case | None) -> AnswerPriorPolicy:
        if case is None:
            raise ValueError(ERR_PRIOR_NO_CASE)
        bound = copy.copy(self)
        bound.case = case
        return bound

    def next_turn(self, messages: list[Message], *, temperature: float = 0.0) -> str:
        if self.case is None:
            raise ValueError(ERR_PRIOR_NO_CASE)
        from medgym.environments.expert import blank_answer

        known = self.answers.get(self.case.template)
        return known if known is not None else f"<answer>{blank_answer(self.case.answer_type)}</answer>"
