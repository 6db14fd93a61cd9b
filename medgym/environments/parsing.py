"""Parsing a model turn: tool calls, an answer, an optional box.

A turn is free text (thoughts may come first) containing either one or more
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, or an
``<answer>...</answer>`` with an optional ``<box>[x0, y0, x1, y1]</box>``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

ERR_EMPTY = "Format error: no <tool_call> or <answer> found. Call a tool with <tool_call>{...}</tool_call> or reply with <answer>...</answer>."
ERR_BOTH = (
    "Format error: a turn holds either tool calls or an answer, not both. Call the tools first, answer in a later turn."
)
ERR_UNCLOSED = "Format error: <{tag}> is opened but not closed with </{tag}>."
ERR_CALL_JSON = 'Format error: tool call {i} is not valid JSON ({details}). Write <tool_call>{{"name": "zoom", "arguments": {{...}}}}</tool_call>.'
ERR_CALL_SHAPE = 'Format error: tool call {i} must be an object with a string "name" and an object "arguments".'
ERR_BOX = "Format error: <box> must hold four finite numbers [x0, y0, x1, y1]."
ERR_MANY_ANSWERS = "Format error: give exactly one <answer>."
ERR_CALL_DEEP = (
    "Format error: tool call {i} nests deeper than {limit} levels of lists and objects. "
    'Tool arguments are flat: write {{"name": "zoom", "arguments": {{"boxes": [[x0, y0, x1, y1]]}}}}.'
)

# Tool arguments are at most a list of lists deep; anything far deeper is garbage, and it must not
# reach the traces (JSON readers stop at a few hundred levels, which would make the file unreadable).
MAX_JSON_DEPTH = 32

_TAGS = ("tool_call", "answer", "box")


@dataclass
class Action:
    calls: list[dict[str, Any]] = field(default_factory=list)
    answer: str | None = None
    box: list[float] | None = None
    error: str | None = None


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last assistant turn of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content", "")
        if isinstance(content, list):
            # Text parts only: image parts and malformed parts (no text, or text that is not a string) add nothing.
            return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        return str(content or "")
    if isinstance(completion, list):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
                return completion_text(message)
    return ""


class InvalidJSON(ValueError):
    """JSON that does not load: its reason, as the model should read it."""


def load_json(text: str) -> Any:
    """``json.loads`` that raises only :class:`ValueError` with a readable reason.

    Besides malformed text, the standard parser raises ``RecursionError`` on deep nesting and
    ``ValueError`` on integers of more than 4300 digits; both are garbage a model can emit.

    >>> load_json('{"a": [1, 2]}')
    {'a': [1, 2]}
    >>> load_json("[" * 5000 + "]" * 5000)
    Traceback (most recent call last):
    ...
    medgym.environments.parsing.InvalidJSON: nested too deeply
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJSON(exc.msg) from None
    except RecursionError:
        raise InvalidJSON("nested too deeply") from None
    except ValueError:  # int(...) of a number with more than 4300 digits
        raise InvalidJSON("a number has thousands of digits; write numbers of a few digits") from None


def call_arguments(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments as an object; a JSON string (as some chat templates emit) is decoded.

    Raises :class:`InvalidJSON` for a string that does not load and ``TypeError`` for anything that is
    not an object once loaded.

    >>> call_arguments('{"candidate": 1}'), call_arguments({"box": [1, 2, 3, 4]})
    ({'candidate': 1}, {'box': [1, 2, 3, 4]})
    >>> call_arguments("[1]")
    Traceback (most recent call last):
    ...
    TypeError: arguments must be a JSON object, got list
    """
    if isinstance(arguments, str):
        arguments = load_json(arguments)
    if not isinstance(arguments, dict):
        raise TypeError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    return arguments


def json_depth(value: Any) -> int:
    """Levels of lists and objects in a loaded JSON value (iterative: no recursion limit).

    >>> json_depth(1), json_depth([]), json_depth({"a": [[1], 2]})
    (0, 1, 3)
    """
    depth, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        if isinstance(item, (list, dict)):
            depth = max(depth, d)
            level.extend((v, d + 1) for v in (item.values() if isinstance(item, dict) else item))
    return depth


def _finite_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer beyond the float range
        return False


def parse_box(text: str) -> list[float] | None:
    """Four finite numbers ``[x0, y0, x1, y1]``, or None.

    >>> parse_box("[1, 2.5, 3, 4]"), parse_box("[1, 2, 3]"), parse_box("[NaN, 0, 1, 1]"), parse_box("[1e999, 0, 1, 1]")
    ([1.0, 2.5, 3.0, 4.0], None, None, None)
    """
    try:
        values = load_json(text)
    except InvalidJSON:
        return None
    if isinstance(values, list) and len(values) == 4 and all(_finite_number(v) for v in values):
        return [float(v) for v in values]
    return None


def parse_action(text: str) -> Action:
    """Parse one model turn. Never raises; problems come back in ``Action.error``.

    >>> parse_action('<tool_call>{"name": "zoom", "arguments": {"boxes": [[0, 0, 9, 9]]}}</tool_call>').calls[0]["name"]
    'zoom'
    >>> a = parse_action("I see it. <answer>12.5</answer><box>[1, 2, 30, 40]</box>")
    >>> a.answer, a.box
    ('12.5', [1.0, 2.0, 30.0, 40.0])
    >>> parse_action("just text").error == ERR_EMPTY
    True
    """
    if not isinstance(text, str):
        return Action(error=ERR_EMPTY)
    for tag in _TAGS:
        if text.count(f"<{tag}>") != text.count(f"</{tag}>"):
            return Action(error=ERR_UNCLOSED.format(tag=tag))
    raw_calls = re.findall(r"<tool_call>(.*?)</tool_call>", text, flags=re.S)
    answers = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    boxes = re.findall(r"<box>(.*?)</box>", text, flags=re.S)
    if raw_calls and answers:
        return Action(error=ERR_BOTH)
    if len(answers) > 1:
        return Action(error=ERR_MANY_ANSWERS)
    action = Action()
    for i, raw in enumerate(raw_calls, start=1):
        try:
            call = load_json(raw)
        except InvalidJSON as exc:
            return Action(error=ERR_CALL_JSON.format(i=i, details=exc))
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return Action(error=ERR_CALL_SHAPE.format(i=i))
        try:
            arguments = call_arguments(call.get("arguments", {}))
        except InvalidJSON as exc:
            return Action(error=ERR_CALL_JSON.format(i=i, details=exc))
        except TypeError:
            return Action(error=ERR_CALL_SHAPE.format(i=i))
        if json_depth(arguments) > MAX_JSON_DEPTH:
            return Action(error=ERR_CALL_DEEP.format(i=i, limit=MAX_JSON_DEPTH))
        action.calls.append({"name": call["name"], "arguments": arguments})
    if boxes:
        action.box = parse_box(boxes[-1].strip())
        if action.box is None:
            return Action(error=ERR_BOX)
    if answers:
        action.answer = re.sub(r"<box>.*?</box>", "", answers[0], flags=re.S).strip()
    if not action.calls and action.answer is None:
        return Action(error=ERR_EMPTY)
    return action
