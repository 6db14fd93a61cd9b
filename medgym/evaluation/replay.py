"""Replay: rebuild each recorded case and re-run its calls through the one call runner.

The re-run half of ``medgym replay``; the report types, the comparison and the integrity
checks are the pure half in :mod:`medgym.traces.replay`. For each episode, the case is rebuilt
from the header (``make_source(source_spec, **source_config).case(seed)``, or
``<cases_dir>/<case_id>.json`` written by ``medgym generate``), checked against the recorded
study hash, and a fresh tool context — in the episode's recorded tool mode — runs the recorded
calls in order through :func:`medgym.environments.runner.run_call`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from medgym.environments.case import Case
from medgym.environments.contract import prompt_hash
from medgym.environments.runner import run_call
from medgym.environments.sources import make_source
from medgym.tools import TOOLS, ToolContext
from medgym.tools.imaging import to_display
from medgym.traces.replay import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    ERR_CASE_DIFFERS,
    ERR_NO_CASE,
    FALLBACK_SEGMENTER,
    EpisodeReplay,
    ImageChecker,
    ReplayReport,
    StepDiff,
    compare_call,
    verify_episode,
)
from medgym.traces.schema import TraceEpisode, TraceHeader
from medgym.traces.store import ImageStore, image_hash, iter_lines

log = logging.getLogger(__name__)
# Traces written before tool modes existed ran their tools as the oracle does.
LEGACY_TOOL_MODE = "oracle"


def tool_mode_of(header: TraceHeader) -> str:
    return header.tool_mode or LEGACY_TOOL_MODE


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
                self._sources[key] = make_source(spec, tool_mode=tool_mode_of(header), **header.source_config)
            except (ValueError, TypeError, OSError) as exc:
                raise ValueError(ERR_NO_CASE.format(why=f"source {spec!r}: {exc}")) from exc
        return self._sources[key].case(header.seed)


def case_mismatch(header: TraceHeader, case: Any) -> str | None:
    """Why a rebuilt case is not the recorded one, or None."""
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
    ctx = ToolContext(
        study=case.study,
        prior=case.prior,
        segmenter=segmenter,
        sam_checkpoint=sam_checkpoint,
        tool_mode=tool_mode_of(episode.header),  # type: ignore[arg-type]
    )
    n, diffs, notes = 0, [], []
    episode_no, line = position
    for step in episode.steps:
        for k, call in enumerate(step.calls, start=1):
            n += 1
            record = run_call(call.name, call.arguments, ctx)
            fresh = record.to_trace(None, [image_hash(img) for img in record.images])
            # A tool that raises is named as such, not as a changed text (the record says so too).
            what = [f"the tool raised {record.crash}"] if record.crash else compare_call(call, fresh, rtol, atol)
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
        prompt_now = prompt_hash(tool_mode_of(header))
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
