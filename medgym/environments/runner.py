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
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic_core import to_jsonable_python

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
            name=str(self.name),
            arguments=_json_safe(arguments),
            tool_version=self.tool_version,
            text=self.text,
            data=_json_safe(self.data),
            images=image_hashes,
            error=self.error,
            seconds=round(self.seconds, 6),
        )


def _json_safe(value: Any) -> Any:
    return to_jsonable_python(value, fallback=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


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
