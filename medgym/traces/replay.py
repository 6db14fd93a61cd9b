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

Import rule: ``traces`` is the bottom layer, and ``tools`` and ``environments`` import
it (to write traces). Replay needs both (the tool registry, the sources that rebuild
cases), so it imports them *inside* :func:`rebuild_case` and :func:`replay_episode`,
when a replay actually runs; importing this module stays free of them and cycles.
The comparison itself (:func:`diff_values`, :func:`compare_call`) is pure.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgym.traces.schema import ToolCallRecord, TraceEpisode, TraceHeader
from medgym.traces.store import ImageStore, image_hash, iter_lines

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


def segmenter_of(episode: TraceEpisode, override: str | None = None) -> str:
    """The segment backend to replay with: override, header, the backend recorded by segment, or the default."""
    if override:
        return override
    if episode.header.segmenter:
        return episode.header.segmenter
    for step in episode.steps:
        for call in step.calls:
            backend = call.data.get("backend") if call.name == "segment" else None
            if backend in ("medsam", "sam", "threshold"):
                return backend
    return FALLBACK_SEGMENTER


class CaseBuilder:
    """Rebuilds recorded cases; one source object per (spec, settings)."""

    def __init__(self, cases_dir: Path | str | None = None):
        self.cases_dir = Path(cases_dir) if cases_dir is not None else None
        self._sources: dict[str, Any] = {}

    def build(self, header: TraceHeader) -> Any:
        """The case of a header (a ``medgym.environments.case.Case``); raises ValueError when impossible."""
        # Lazy: environments imports traces, so traces may only import it while replaying.
        import json

        from medgym.environments.case import Case
        from medgym.environments.sources import make_source

        if self.cases_dir is not None:
            path = self.cases_dir / f"{header.case_id}.json"
            if path.exists():
                return Case.load(path)
        if header.seed is None:
            raise ValueError(ERR_NO_CASE.format(why="the trace has no seed; pass --cases DIR with the saved case"))
        spec = header.source_spec or header.source
        key = json.dumps([spec, header.source_config], sort_keys=True, default=str)
        if key not in self._sources:
            try:
                self._sources[key] = make_source(spec, **header.source_config)
            except (ValueError, TypeError, OSError) as exc:
                raise ValueError(ERR_NO_CASE.format(why=f"source {spec!r}: {exc}")) from exc
        return self._sources[key].case(header.seed)


def case_mismatch(header: TraceHeader, case: Any) -> str | None:
    """Why a rebuilt case is not the recorded one, or None."""
    from medgym.tools.imaging import to_display

    if header.case_id != case.case_id:
        return f"case id recorded {header.case_id}, rebuilt {case.case_id}"
    if header.study_hash is not None:
        got = case.study.content_hash()
        return None if got == header.study_hash else f"study hash recorded {header.study_hash}, rebuilt {got}"
    if header.image is not None:
        got = image_hash(to_display(case.study.plane(), case.study.modality))
        return None if got == header.image else f"question image hash recorded {header.image[:12]}, rebuilt {got[:12]}"
    return None


def replay_episode(
    episode: TraceEpisode,
    case: Any,
    segmenter: str,
    sam_checkpoint: str | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    position: tuple[int, int] = (1, 1),
) -> tuple[int, list[StepDiff], list[str]]:
    """Re-run an episode's calls in order on a fresh context: (calls run, differing calls, notes)."""
    # Lazy: tools imports traces (indirectly, through environments), see the module docstring.
    from pydantic_core import to_jsonable_python

    from medgym.tools import TOOLS, ToolContext, run_tool

    ctx = ToolContext(study=case.study, prior=case.prior, segmenter=segmenter, sam_checkpoint=sam_checkpoint)
    n, diffs, notes = 0, [], []
    episode_no, line = position
    for step in episode.steps:
        for k, call in enumerate(step.calls, start=1):
            n += 1
            try:
                result = run_tool(TOOLS, call.name, call.arguments, ctx)
            except Exception as exc:  # a tool bug: name the step instead of stopping the replay
                log.debug("%s raised during replay", call.name, exc_info=True)
                what = [f"the tool raised {type(exc).__name__}: {exc}"]
                diffs.append(
                    StepDiff(
                        episode_no,
                        line,
                        episode.header.episode_id,
                        episode.header.case_id,
                        step.index,
                        k,
                        call.name,
                        what,
                    )
                )
                continue
            fresh = ToolCallRecord(
                name=call.name,
                arguments=call.arguments,
                text=result.text,
                data=to_jsonable_python(result.data),
                images=[image_hash(img) for img in result.images],
                error=result.error,
            )
            what = compare_call(call, fresh, rtol, atol)
            now = TOOLS[call.name].version if call.name in TOOLS else None
            if call.tool_version is not None and now != call.tool_version:
                note = f"{call.name} was recorded at version {call.tool_version}, now {now}"
                notes.append(note)
                if what:
                    what.append(note)
            if what:
                diffs.append(
                    StepDiff(
                        episode=episode_no,
                        line=line,
                        episode_id=episode.header.episode_id,
                        case_id=episode.header.case_id,
                        step=step.index,
                        call=k,
                        tool=call.name,
                        what=what,
                    )
                )
    return n, diffs, sorted(set(notes))


def replay_file(
    path: Path | str,
    verify: bool = False,
    cases_dir: Path | str | None = None,
    segmenter: str | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    limit: int | None = None,
    progress: Any = None,
) -> ReplayReport:
    """Replay (and with ``verify``, check the integrity of) every episode of a trace file.

    ``progress`` is an optional tqdm-like object with ``update()``; the CLI passes a bar.
    """
    path = Path(path)
    report = ReplayReport(path=str(path), verified=verify)
    builder = CaseBuilder(cases_dir)
    checker = ImageChecker(ImageStore(path.parent / "images", create=False)) if verify else None
    from medgym.environments.env import prompt_hash  # lazy, see the module docstring

    prompt_now = prompt_hash()
    count = 0
    for lineno, item in iter_lines(path):
        if isinstance(item, str):
            log.info("%s: %s", path, item)
            report.file_problems.append(item)
            continue
        if limit is not None and count >= limit:
            break
        count += 1
        header = item.header
        result = EpisodeReplay(episode=count, line=lineno, episode_id=header.episode_id, case_id=header.case_id)
        report.episodes.append(result)
        if verify:
            result.problems += verify_episode(item, checker)
        if header.prompt_hash and header.prompt_hash != prompt_now:
            # Tool results do not depend on the prompt; the model's turns might have.
            result.notes.append(f"the system prompt changed since recording ({header.prompt_hash} -> {prompt_now})")
        try:
            case = builder.build(header)
        except ValueError as exc:
            result.problems.append(str(exc))
            case = None
        except Exception as exc:  # a source that crashes on this seed: report it, replay the rest
            log.debug("rebuilding %s failed", header.case_id, exc_info=True)
            result.problems.append(ERR_NO_CASE.format(why=f"{type(exc).__name__}: {exc}"))
            case = None
        if case is not None:
            mismatch = case_mismatch(header, case)
            if mismatch:
                result.problems.append(ERR_CASE_DIFFERS.format(what=mismatch))
            else:
                result.calls, result.diffs, notes = replay_episode(
                    item,
                    case,
                    segmenter_of(item, segmenter),
                    header.sam_checkpoint,
                    rtol,
                    atol,
                    position=(count, lineno),
                )
                result.notes += notes
        if progress is not None:
            progress.update(1)
    return report
