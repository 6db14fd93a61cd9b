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
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import ValidationError

from medgym.traces.schema import TraceEpisode

log = logging.getLogger(__name__)

PNG_COMPRESS_LEVEL = 1  # ~2.5x faster than PIL's default 6, files ~6% larger


def image_hash(img: np.ndarray) -> str:
    """Content hash of an image's pixels and shape."""
    h = hashlib.sha256(repr((img.shape, img.dtype.str)).encode())
    h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()


class ImageStore:
    """Images stored once by content hash as PNG files."""

    def __init__(self, root: Path | str, create: bool = True):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / f"{digest}.png"

    def put(self, img: np.ndarray) -> str:
        digest = image_hash(img)
        path = self.path(digest)
        if not path.exists():
            buf = io.BytesIO()
            # Fast compression: the hash is over pixels, so the level only trades file size for time.
            Image.fromarray(img).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            # A writer-unique tmp name: vector envs in several processes may store the same image at once.
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
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
    lines: list[int] = field(default_factory=list)  # line number of each episode


def iter_lines(path: Path | str) -> Iterator[tuple[int, TraceEpisode | str]]:
    """(line number, episode) in order; a line that does not load gives a problem string instead."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, TraceEpisode.model_validate_json(line)
            except ValidationError as exc:
                torn = "" if line.endswith("\n") else " (torn last line: the writer was interrupted)"
                detail = "; ".join(
                    (".".join(str(p) for p in e["loc"]) + ": " if e["loc"] else "") + e["msg"] for e in exc.errors()[:3]
                )
                yield lineno, f"line {lineno}: not a valid episode{torn}: {detail}"


def iter_traces(path: Path | str) -> Iterator[TraceEpisode | str]:
    """Episodes in order; a line that does not load yields a problem string instead."""
    for _, item in iter_lines(path):
        yield item


def read_traces(path: Path | str) -> TraceFile:
    """Every episode of a trace file; lines that do not load are logged and listed in ``problems``."""
    out = TraceFile()
    for lineno, item in iter_lines(path):
        if isinstance(item, str):
            # Returned in ``problems`` for the caller to show; logged here for the record only.
            log.info("%s: %s", path, item)
            out.problems.append(item)
        else:
            out.episodes.append(item)
            out.lines.append(lineno)
    return out
