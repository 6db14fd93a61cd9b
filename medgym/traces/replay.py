"""Replay and verify: re-run every recorded tool call on its case and compare with the record.

For each episode, the case is rebuilt from the header (``make_source(source_spec,
**source_config).case(seed)``, or ``<cases_dir>/<case_id>.json`` written by
``medgym generate``), checked against the recorded study hash (or question image
hash), and a fresh :class:`~medgym.tools.base.ToolContext` runs the recorded calls in
their recorded order: masks made by ``segment`` are referenced by later ``measure``
calls, so order matters. Each fresh result is compared with the recorded one: the text
exactly, the error flag, every value of the structured data (numbers within
``rtol``/``atol``), and the images by content hash.

``verify`` adds integrity checks that need no re-run: every episode's content hash
(an edited trace no longer matches it), every image file against its name (the
content hash), and lines of the file that do not load (a torn last line is reported
and the episodes before it are still replayed).

This module is the pure half (``traces`` is the bottom layer and imports nothing above
it): the report types, the comparison (:func:`diff_values`, :func:`compare_call`) and the
integrity checks. The re-run half — rebuilding cases, running the calls through the one
call runner — is :mod:`medgym.evaluation.replay`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from medgym.traces.schema import ToolCallRecord, TraceEpisode
from medgym.traces.store import ImageStore, image_hash

log = logging.getLogger(__name__)

DEFAULT_RTOL = 1e-6  # relative tolerance for numbers in tool data (float noise across platforms)
DEFAULT_ATOL = 1e-9
MAX_DIFFS_PER_CALL = 8
FALLBACK_SEGMENTER = "medsam"  # ToolContext's default: what ran when a trace does not say

ERR_HASH = "content hash mismatch: the episode was edited after it was written"
ERR_UNSEALED = "the episode has no content hash (it was not written by TraceWriter)"
ERR_CASE_DIFFERS = (
    "the rebuilt case differs from the recorded one ({what}); the source or its settings changed. "
    "Pass --cases DIR with the saved cases to replay it."
)
ERR_NO_CASE = "cannot rebuild the case: {why}"


@dataclass
class StepDiff:
    """One recorded tool call whose re-run result differs."""

    episode: int  # 1-based position of the episode in the file
    line: int
    episode_id: str
    case_id: str
    step: int
    call: int  # 1-based position of the call within its step
    tool: str
    what: list[str]

    def describe(self) -> str:
        head = f"episode {self.episode} (line {self.line}, case {self.case_id}) step {self.step} call {self.call} {self.tool}"
        return head + ": " + "; ".join(self.what)


@dataclass
class EpisodeReplay:
    episode: int
    line: int
    episode_id: str
    case_id: str
    calls: int = 0
    diffs: list[StepDiff] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # integrity and rebuild problems
    notes: list[str] = field(default_factory=list)  # informational (tool version changes)

    @property
    def ok(self) -> bool:
        return not self.diffs and not self.problems

    def label(self) -> str:
        return f"episode {self.episode} (line {self.line}, case {self.case_id})"


@dataclass
class ReplayReport:
    path: str
    episodes: list[EpisodeReplay] = field(default_factory=list)
    file_problems: list[str] = field(default_factory=list)  # lines that do not load, torn last line
    verified: bool = False

    @property
    def diffs(self) -> list[StepDiff]:
        return [d for e in self.episodes for d in e.diffs]

    @property
    def ok(self) -> bool:
        """Everything reproduces (and, when verifying, the file is intact)."""
        return all(e.ok for e in self.episodes) and not (self.verified and self.file_problems)

    def summary(self) -> str:
        calls = sum(e.calls for e in self.episodes)
        bad = [e for e in self.episodes if not e.ok]
        head = f"{len(self.episodes)} episodes, {calls} tool calls replayed from {self.path}"
        if self.ok:
            return head + ": everything reproduces" + (" and verifies" if self.verified else "")
        return (
            f"{head}: {len(bad)} episode(s) differ or fail verification, {len(self.diffs)} differing call(s), "
            f"{len(self.file_problems)} file problem(s)"
        )

    def lines(self) -> list[str]:
        """Human-readable problems, one per line (file problems, episode problems, differing steps)."""
        out = [f"{self.path}: {p}" for p in self.file_problems]
        for e in self.episodes:
            out += [f"{e.label()}: {p}" for p in e.problems]
            out += [d.describe() for d in e.diffs]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "verified": self.verified,
            "episodes": len(self.episodes),
            "tool_calls": sum(e.calls for e in self.episodes),
            "file_problems": self.file_problems,
            "episode_problems": [
                {"episode": e.episode, "line": e.line, "case_id": e.case_id, "problem": p}
                for e in self.episodes
                for p in e.problems
            ],
            "diffs": [d.__dict__ for d in self.diffs],
        }


# ----------------------------------------------------------------- comparison (pure)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def diff_text(recorded: str, replayed: str, context: int = 25) -> str | None:
    """Where two texts first differ, with a little context; None when equal.

    >>> diff_text("area 12.5 mm2", "area 12.9 mm2")
    "text differs at character 8: recorded 'area 12.5 mm2', replayed 'area 12.9 mm2'"
    >>> diff_text("same", "same") is None
    True
    """
    if recorded == replayed:
        return None
    i = next(
        (k for k, (a, b) in enumerate(zip(recorded, replayed, strict=False)) if a != b),
        min(len(recorded), len(replayed)),
    )
    lo = max(0, i - context)
    return (
        f"text differs at character {i}: recorded {recorded[lo : i + context]!r}, "
        f"replayed {replayed[lo : i + context]!r}"
    )


def diff_values(
    recorded: Any, replayed: Any, path: str = "data", rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL
) -> list[str]:
    """Differences between two JSON-like values; numbers compare within ``rtol``/``atol``.

    >>> diff_values({"d": 17.194, "n": 1, "box": [1, 2, 3, 4]}, {"d": 17.5, "n": 1, "box": [1, 2, 3, 5]})
    ['data.d: recorded 17.194, replayed 17.5', 'data.box[3]: recorded 4, replayed 5']
    >>> diff_values({"a": 1.0}, {"a": 1.0 + 1e-12, "b": 2})
    ['data.b: not recorded, replayed 2']
    """
    if isinstance(recorded, bool) or isinstance(replayed, bool):
        return [] if recorded is replayed else [f"{path}: recorded {_short(recorded)}, replayed {_short(replayed)}"]
    if isinstance(recorded, (int, float)) and isinstance(replayed, (int, float)):
        a, b = float(recorded), float(replayed)
        same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rtol, abs_tol=atol)
        return [] if same else [f"{path}: recorded {recorded!r}, replayed {replayed!r}"]
    if isinstance(recorded, dict) and isinstance(replayed, dict):
        out: list[str] = []
        for key in recorded:
            if key not in replayed:
                out.append(f"{path}.{key}: recorded {_short(recorded[key])}, missing in replay")
            else:
                out += diff_values(recorded[key], replayed[key], f"{path}.{key}", rtol, atol)
        out += [
            f"{path}.{key}: not recorded, replayed {_short(replayed[key])}" for key in replayed if key not in recorded
        ]
        return out
    if isinstance(recorded, list) and isinstance(replayed, list):
        if len(recorded) != len(replayed):
            return [f"{path}: recorded {len(recorded)} items, replayed {len(replayed)}"]
        out = []
        for i, (a, b) in enumerate(zip(recorded, replayed, strict=False)):
            out += diff_values(a, b, f"{path}[{i}]", rtol, atol)
        return out
    return [] if recorded == replayed else [f"{path}: recorded {_short(recorded)}, replayed {_short(replayed)}"]


def compare_call(
    recorded: ToolCallRecord, replayed: ToolCallRecord, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL
) -> list[str]:
    """What differs between a recorded call and its re-run (both as records; images as hashes)."""
    what: list[str] = []
    if recorded.error != replayed.error:
        what.append(f"error flag: recorded {recorded.error}, replayed {replayed.error}")
    text = diff_text(recorded.text, replayed.text)
    if text:
        what.append(text)
    what += diff_values(recorded.data, replayed.data, "data", rtol, atol)
    if len(recorded.images) != len(replayed.images):
        what.append(f"images: recorded {len(recorded.images)}, replayed {len(replayed.images)}")
    else:
        what += [
            f"image {i + 1}: content hash recorded {a[:12]}, replayed {b[:12]}"
            for i, (a, b) in enumerate(zip(recorded.images, replayed.images, strict=True))
            if a != b
        ]
    if len(what) > MAX_DIFFS_PER_CALL:
        what = what[:MAX_DIFFS_PER_CALL] + [f"... and {len(what) - MAX_DIFFS_PER_CALL} more differences"]
    return what


# ----------------------------------------------------------------- integrity (no re-run)


class ImageChecker:
    """Checks image files against their content-hash names, each file once."""

    def __init__(self, store: ImageStore):
        self.store = store
        self._seen: dict[str, str | None] = {}

    def problem(self, digest: str) -> str | None:
        if digest not in self._seen:
            path = self.store.path(digest)
            if not path.exists():
                self._seen[digest] = f"image {digest[:12]} is missing from {self.store.root}"
            else:
                try:
                    got = image_hash(self.store.get(digest))
                except (OSError, ValueError) as exc:
                    self._seen[digest] = f"image {digest[:12]} does not load: {exc}"
                else:
                    self._seen[digest] = (
                        None if got == digest else f"image {digest[:12]} was altered (its pixels hash to {got[:12]})"
                    )
        return self._seen[digest]


def episode_images(episode: TraceEpisode) -> list[str]:
    """Every image hash an episode references, in order of appearance."""
    out = [h for h in (episode.header.image, episode.header.prior_image) if h]
    out += [h for step in episode.steps for call in step.calls for h in call.images]
    return out


def verify_episode(episode: TraceEpisode, images: ImageChecker | None) -> list[str]:
    """Integrity problems of one episode: content hash, image files."""
    problems = []
    if episode.content_hash is None:
        problems.append(ERR_UNSEALED)
    elif episode.content_hash != episode.compute_hash():
        problems.append(ERR_HASH)
    if images is not None:
        problems += [p for p in dict.fromkeys(images.problem(h) for h in episode_images(episode)) if p]
    return problems


# ----------------------------------------------------------------- re-running (lazy imports)
