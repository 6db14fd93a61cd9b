"""Versioned traces of episodes: schema, append-only store, images by content hash."""

from medgym.traces.schema import SCHEMA_VERSION, ToolCallRecord, TraceEpisode, TraceHeader, TraceStep
from medgym.traces.store import ImageStore, TraceWriter, image_hash, read_traces

__all__ = [
    "SCHEMA_VERSION",
    "ImageStore",
    "ToolCallRecord",
    "TraceEpisode",
    "TraceHeader",
    "TraceStep",
    "TraceWriter",
    "image_hash",
    "read_traces",
]
