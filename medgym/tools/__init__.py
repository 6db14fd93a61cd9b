"""The medgym tools and their registry (a plain dict: name -> ToolSpec)."""

from __future__ import annotations

from medgym.tools import detect, measure, retrieve, segment, window, zoom
from medgym.tools.base import (
    Study,
    ToolContext,
    ToolInputError,
    ToolResult,
    ToolSpec,
    run_tool,
)

TOOLS: dict[str, ToolSpec] = {
    spec.name: spec for spec in (zoom.SPEC, window.SPEC, detect.SPEC, segment.SPEC, measure.SPEC, retrieve.SPEC)
}

__all__ = ["TOOLS", "Study", "ToolContext", "ToolInputError", "ToolResult", "ToolSpec", "run_tool"]
