"""The one call runner: parsed tool calls + a tool context -> one record per call.

Every runtime that runs a model's tool calls goes through :func:`run_calls` — the env's
``step``, the agent graph's tools node, the TRL bridge's tool methods and replay's re-run —
so a call behaves, is timed and is recorded the same way everywhere. A :class:`CallRecord`
holds what the model is shown (text and images) and what rewards, traces and the UI need
(arguments, tool version, structured data, error flag, seconds); :meth:`CallRecord.to_trace`
turns it into the trace schema's :class:`~medgym.traces.ToolCallRecord`.

A tool that raises (a bug, not bad input: bad input is already an error result) becomes an
error record the model can read, so no runtime loses an episode or a chat session to it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic_core import to_jsonable_python

from medgym.environments.parsing import MAX_JSON_DEPTH
from medgym.tools import TOOLS, ToolContext, ToolSpec, run_tool
from medgym.traces import ImageStore, ToolCallRecord

log = logging.getLogger(__name__)

MAX_CALLS_PER_TURN = 8
ERR_TOOL_CRASHED = "Error: {name} failed unexpectedly ({details}). Try other arguments or another tool."
ERR_TOO_MANY_CALLS = (
    "Error: at most {limit} tool calls per turn; the {extra} call(s) after the first {limit} were not run. "
    "Call them in the next turn."
)


@dataclass
class CallRecord:
    """One tool call as it ran: what the model wrote, what it is shown, what scoring and traces keep."""

    name: str
    arguments: Any
    tool_version: str | None
    text: str
    data: dict[str, Any] = field(default_factory=dict)
    images: list[np.ndarray] = field(default_factory=list)
    error: bool = False
    seconds: float = 0.0
    crash: str | None = None  # "Type: message" when the tool raised (a bug), not when it rejected input

    @property
    def ok(self) -> bool:
        """The call ran without an error result (what the tool-use reward counts)."""
        return not self.error

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def observation(self) -> str:
        """The text the model reads for this call: ``[name] text``, as in every runtime's tool turn."""
        return f"[{self.name}] {self.text}"

    def to_trace(self, store: ImageStore | None, image_hashes: list[str] | None = None) -> ToolCallRecord:
        """The trace record: images stored by content hash (or the hashes given), data made JSON-safe."""
        if image_hashes is None:
            image_hashes = [store.put(img) for img in self.images] if store is not None else []
        arguments = self.arguments if isinstance(self.arguments, dict) else {"_raw": self.arguments}
        return ToolCallRecord(
            name=utf8(str(self.name)),
            arguments=_json_safe(arguments),
            tool_version=self.tool_version,
            text=utf8(self.text),
            data=_json_safe(self.data),
            images=image_hashes,
            error=self.error,
            seconds=round(self.seconds, 6),
        )


# How a trace keeps numbers JSON has no literal for (pydantic would write null, and the sealed hash
# would no longer match the line read back). Tools read these strings as the same numbers, so a
# replayed call is refused with the same text as the recorded one.
NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
TOO_DEEP = "<nested too deeply>"
MAX_INT_BITS = 13_000  # about 3900 digits: JSON readers (and int -> str) stop at 4300


def utf8(text: str) -> str:
    """The text with what UTF-8 cannot hold (lone surrogates) replaced by '?': what a trace can store.

    >>> utf8("ok"), utf8("a\\ud800b")
    ('ok', 'a?b')
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _json_safe(value: Any, depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON-able copy for a trace: arrays as lists, non-finite floats as strings, text UTF-8 safe,
    nesting cut at ``depth`` levels (readers of the trace file stop at a few hundred).

    >>> _json_safe({"a": (1, float("nan")), 2: np.float32(0.5), "deep": [[[1]]]}, depth=3)
    {'a': [1, 'NaN'], '2': 0.5, 'deep': [['<nested too deeply>']]}
    """
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= MAX_INT_BITS else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else NON_FINITE[str(value)]
    if isinstance(value, str):
        return utf8(value)
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        if depth <= 0:
            return TOO_DEEP
        if isinstance(value, dict):
            return {utf8(str(k)): _json_safe(v, depth - 1) for k, v in value.items()}
        return [_json_safe(v, depth - 1) for v in value]
    plain = to_jsonable_python(value, fallback=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return str(plain) if type(plain) is type(value) else _json_safe(plain, depth)


def run_call(name: Any, arguments: Any, ctx: ToolContext, registry: dict[str, ToolSpec] = TOOLS) -> CallRecord:
    """Run one call; bad input and tool crashes both come back as error records."""
    start = time.perf_counter()
    crash = None
    try:
        result = run_tool(registry, name, arguments, ctx)
        text, images, data, error = result.text, result.images, result.data, result.error
    except Exception as exc:  # a tool bug: the model and the user read it; the episode goes on
        log.exception("tool %s crashed", name)
        crash = f"{type(exc).__name__}: {exc}"
        text = ERR_TOOL_CRASHED.format(name=name, details=crash)
        images, data, error = [], {}, True
    spec = registry.get(name) if isinstance(name, str) else None
    return CallRecord(
        name=str(name),
        arguments=arguments,
        tool_version=spec.version if spec is not None else None,
        text=text,
        data=data,
        images=list(images),
        error=bool(error),
        seconds=time.perf_counter() - start,
        crash=crash,
    )


def run_calls(
    calls: list[dict[str, Any]],
    ctx: ToolContext,
    registry: dict[str, ToolSpec] = TOOLS,
    limit: int | None = MAX_CALLS_PER_TURN,
) -> tuple[list[CallRecord], str | None]:
    """Run a turn's parsed calls (``{"name", "arguments"}``) in order on one context.

    Returns the records and, when the turn held more than ``limit`` calls, the note the model
    reads about the calls that were not run (``None`` otherwise).
    """
    run = calls if limit is None else calls[:limit]
    records = [run_call(c.get("name"), c.get("arguments"), ctx, registry) for c in run]
    note = None
    if limit is not None and len(calls) > limit:
        note = ERR_TOO_MANY_CALLS.format(limit=limit, extra=len(calls) - limit)
    return records, note
