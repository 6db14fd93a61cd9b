"""Trace storage: an append-only JSONL file of episodes and a content-addressed image folder.

``TraceWriter`` appends one sealed episode per line and flushes it to disk, so a crash
leaves every earlier episode readable. ``read_traces`` reports a torn last line instead
of failing on it. Images live once each in ``images/<sha256>.png`` beside the file.

A trace writer's image store encodes PNGs on a background thread, off the env step's path:
``put`` only hashes the image (the digest goes into the step's record), and the writer waits
for every pending image before it writes an episode line, so a reader who can see an episode
can open all its images.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import logging
import os
import struct
import threading
import weakref
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import ValidationError

from medgym.traces.schema import TraceEpisode

log = logging.getLogger(__name__)

PNG_COMPRESS_LEVEL = 1  # zlib's fastest: the hash is over pixels, so the level only trades file size for time
KNOWN_DIGESTS = 65_536  # digests a store remembers as written (no disk check when they come again)
WRITER_IDLE_S = 1.0  # a background writer thread with nothing to do for this long exits
ERR_IMAGE_WRITE = "could not write image {digest} to {root}: {details}. Check the disk space and permissions there."


def _digest(shape: tuple[int, ...], dtype: np.dtype, data: bytes | memoryview) -> str:
    h = hashlib.sha256(repr((shape, dtype.str)).encode())
    h.update(data)
    return h.hexdigest()


def image_hash(img: np.ndarray) -> str:
    """Content hash of an image's pixels and shape."""
    return _digest(img.shape, img.dtype, _pixels(img))


def _pixels(img: np.ndarray) -> memoryview | bytes:
    """The image's bytes in C order, without a copy when it is contiguous."""
    arr = np.ascontiguousarray(img)
    return arr.data.cast("B") if arr.size else b""


# PNG colour types of 8-bit images by channel count: grey, grey + alpha, RGB, RGBA.
PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def png_bytes(img: np.ndarray) -> bytes:
    """A PNG file of an image, as ``np.asarray(PIL.Image.open(...))`` reads it back.

    8-bit grey (H, W), grey + alpha, RGB and RGBA (H, W, 2|3|4) images are written here:
    unfiltered rows compressed by zlib at ``PNG_COMPRESS_LEVEL``, 2-3x faster than Pillow's
    encoder at the same level (which tries a filter per row) for files of about the same size,
    and zlib lets other threads run while it compresses. Other images go through Pillow.
    """
    arr = np.ascontiguousarray(img)
    channels = 1 if arr.ndim == 2 else arr.shape[-1]
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or arr.ndim == 3 and channels == 1 or arr.size == 0:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buf.getvalue()
    h, w = arr.shape[:2]
    rows = np.zeros((h, 1 + w * channels), dtype=np.uint8)  # a leading 0 per row: filter type None
    rows[:, 1:] = arr.reshape(h, -1)
    header = struct.pack(">IIBBBBB", w, h, 8, PNG_COLOR_TYPES[channels], 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.data, PNG_COMPRESS_LEVEL)),
            _png_chunk(b"IEND", b""),
        )
    )


class ImageStore:
    """Images stored once by content hash as PNG files.

    With ``background=True`` a writer thread encodes and writes the PNGs: ``put`` returns once
    the image is hashed and copied, ``flush`` waits until every image put so far is on disk (and
    raises if one could not be written), ``get`` waits for a pending image. Without it, ``put``
    writes before it returns (for stores that other processes or instances read at once).
    """

    def __init__(self, root: Path | str, create: bool = True, background: bool = False):
        self.root = Path(root)
        self.background = background
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        self._known: OrderedDict[str, None] = OrderedDict()
        self._reset_writer()
        _STORES.add(self)

    def _reset_writer(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, bytes, tuple[int, ...], np.dtype]] = deque()
        self._pending: set[str] = set()
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def path(self, digest: str) -> Path:
        return self.root / f"{digest}.png"

    def put(self, img: np.ndarray) -> str:
        arr = np.ascontiguousarray(img)
        digest = _digest(img.shape, img.dtype, _pixels(arr))
        with self._cond:
            if digest in self._known:
                self._known.move_to_end(digest)
                return digest
            if self.background:
                # A copy: the caller may reuse its array before the writer gets to it.
                self._queue.append((digest, arr.tobytes(), arr.shape, arr.dtype))
                self._pending.add(digest)
                self._remember(digest)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._drain, name="medgym-image-writer", daemon=True)
                    self._thread.start()
                self._cond.notify_all()
                return digest
        self._write(digest, arr)
        with self._cond:
            self._remember(digest)
        return digest

    def _remember(self, digest: str) -> None:
        self._known[digest] = None
        if len(self._known) > KNOWN_DIGESTS:
            self._known.popitem(last=False)

    def _write(self, digest: str, arr: np.ndarray) -> None:
        path = self.path(digest)
        if path.exists():
            return
        data = png_bytes(arr)
        # A writer-unique tmp name: vector envs in several processes may store the same image at once.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _drain(self) -> None:
        """The writer thread: write queued images until none has come for WRITER_IDLE_S."""
        while True:
            with self._cond:
                if not self._queue:
                    self._cond.wait(WRITER_IDLE_S)
                if not self._queue:
                    self._thread = None
                    return
                digest, data, shape, dtype = self._queue.popleft()
            try:
                self._write(digest, np.frombuffer(data, dtype=dtype).reshape(shape))
            except Exception as exc:  # reported by the next flush, not lost in this thread
                log.exception("image writer: %s", digest)
                with self._cond:
                    self._error = ERR_IMAGE_WRITE.format(digest=digest, root=self.root, details=exc)
                    self._known.pop(digest, None)  # a later put tries again
            with self._cond:
                self._pending.discard(digest)
                self._cond.notify_all()

    def flush(self) -> None:
        """Wait until every image put so far is on disk; raise OSError if one could not be written."""
        with self._cond:
            while self._pending:
                self._cond.wait()
            error, self._error = self._error, None
        if error is not None:
            raise OSError(error)

    def get(self, digest: str) -> np.ndarray:
        with self._cond:
            while digest in self._pending:
                self._cond.wait()
        return np.asarray(Image.open(self.path(digest)))


# Every store, so pending images are written at exit and a forked child does not wait on its
# parent's writer thread (which the child does not have).
_STORES: weakref.WeakSet[ImageStore] = weakref.WeakSet()


@atexit.register
def _flush_all_stores() -> None:
    for store in list(_STORES):
        try:
            store.flush()
        except OSError as exc:
            log.error("%s", exc)


def _forget_writers_after_fork() -> None:
    for store in list(_STORES):
        store._reset_writer()  # the parent writes what it queued


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_writers_after_fork)


def _ends_torn(path: Path) -> bool:
    """Whether a trace file ends inside a line (the last write was cut short)."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except (FileNotFoundError, OSError):  # no file yet, or an empty one
        return False


class TraceWriter:
    """Append sealed episodes to a JSONL file; images go to ``<file dir>/images`` (written in the background)."""

    def __init__(self, path: Path | str, background_images: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.images = ImageStore(self.path.parent / "images", background=background_images)

    def write(self, episode: TraceEpisode) -> TraceEpisode:
        # The episode's images first: a reader who sees the line can open every image it names.
        self.images.flush()
        sealed = episode.sealed()
        line = sealed.model_dump_json() + "\n"
        if _ends_torn(self.path):  # a killed run left half a line: start a fresh one, keep the fragment apart
            line = "\n" + line
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return sealed

    def flush(self) -> None:
        """Wait until every image stored so far is on disk."""
        self.images.flush()

    def close(self) -> None:
        """Flush the images (the trace file is opened per episode, so nothing else stays open)."""
        self.images.flush()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
