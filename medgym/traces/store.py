"""Trace storage: an append-only JSONL file of episodes and a content-addressed image folder.

``TraceWriter`` appends one sealed episode per line and flushes it to disk, so a crash
leaves every earlier episode readable. ``read_traces`` reports a torn last line instead
of failing on it. Images live once each in ``images/<sha256>.png`` beside the file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medgym.traces.schema import TraceEpisode

log = logging.getLogger(__name__)


def image_hash(img: np.ndarray) -> str:
    """Content hash of an image's pixels and shape."""
    h = hashlib.sha256(repr((img.shape, img.dtype.str)).encode())
    h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()


class ImageStore:
    """Images stored once by content hash as PNG files."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / f"{digest}.png"

    def put(self, img: np.ndarray) -> str:
        digest = image_hash(img)
        path = self.path(digest)
        if not path.exists():
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, path)
        return digest

    def get(self, digest: str) -> np.ndarray:
        return np.asarray(Image.open(self.path(digest)))


class TraceWriter:
    """Append sealed episodes to a JSONL file; images go to ``<file dir>/images``."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.images = ImageStore(self.path.parent / "images")

    def write(self, episode: TraceEpisode) -> TraceEpisode:
        sealed = episode.sealed()
        line = sealed.model_dump_json() + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return sealed


@dataclass
class TraceFile:
    episodes: list[TraceEpisode] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def iter_traces(path: Path | str) -> Iterator[TraceEpisode | str]:
    """Episodes in order; a line that does not load yields a problem string instead."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield TraceEpisode.model_validate_json(line)
            except ValueError as exc:
                torn = "" if line.endswith("\n") else " (torn last line: the writer was interrupted)"
                yield f"line {lineno}: not a valid episode{torn}: {str(exc).splitlines()[0]}"


def read_traces(path: Path | str) -> TraceFile:
    out = TraceFile()
    for item in iter_traces(path):
        if isinstance(item, str):
            log.warning("%s: %s", path, item)
            out.problems.append(item)
        else:
            out.episodes.append(item)
    return out
