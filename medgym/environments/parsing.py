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
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content or "")
    if isinstance(completion, list):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
                return completion_text(message)
    return ""


def parse_box(text: str) -> list[float] | None:
    try:
        values = json.loads(text)
    except json.JSONDecodeError:
        return None
    if (
        isinstance(values, list)
        and len(values) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    ):
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
            call = json.loads(raw)
        except json.JSONDecodeError as exc:
            return Action(error=ERR_CALL_JSON.format(i=i, details=exc.msg))
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return Action(error=ERR_CALL_SHAPE.format(i=i))
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some chat templates emit arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                return Action(error=ERR_CALL_JSON.format(i=i, details=exc.msg))
        if not isinstance(arguments, dict):
            return Action(error=ERR_CALL_SHAPE.format(i=i))
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
