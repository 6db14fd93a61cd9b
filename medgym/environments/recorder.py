"""The one episode recorder: a trace header from the case and the run's settings, then steps.

Env episodes, chat questions, ``medgym eval`` and GRPO rollouts all write their traces through
:class:`EpisodeRecorder`, so every trace carries what ``medgym replay --verify`` needs to rebuild
the case and the tool context: the source spec and its settings, the study hash, the segmenter,
the tool mode, the model id and the prompt hash.
"""

from __future__ import annotations

import importlib.metadata
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medgym.environments.case import Case
from medgym.environments.contract import DEFAULT_TOOL_MODE, check_tool_mode, prompt_hash
from medgym.environments.runner import CallRecord
from medgym.tools import TOOLS
from medgym.traces import ToolCallRecord, TraceEpisode, TraceHeader, TraceStep, TraceWriter


def medgym_version() -> str | None:
    try:
        return importlib.metadata.version("medgym")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class RunSettings:
    """What a run was started with and replay needs: where cases come from and how tools ran."""

    source_spec: str | None = None  # make_source(spec, **source_config) rebuilds the case
    source_config: dict[str, Any] = field(default_factory=dict)
    segmenter: str = "medsam"
    sam_checkpoint: str | None = None
    tool_mode: str = DEFAULT_TOOL_MODE
    model_id: str = "unknown"
    env_id: str | None = None

    def __post_init__(self) -> None:
        check_tool_mode(self.tool_mode)


def episode_header(settings: RunSettings, question: str, image: str | None, **episode: Any) -> TraceHeader:
    """The one trace-header builder: the run's settings, then what the episode is about (``episode`` fields)."""
    return TraceHeader(
        episode_id=uuid.uuid4().hex,
        env_id=settings.env_id,
        question=question,
        image=image,
        model_id=settings.model_id,
        prompt_hash=prompt_hash(settings.tool_mode),
        tool_versions={name: spec.version for name, spec in TOOLS.items()},
        source_spec=settings.source_spec,
        source_config=json.loads(json.dumps(settings.source_config, default=str)),
        segmenter=settings.segmenter,
        sam_checkpoint=settings.sam_checkpoint,
        tool_mode=settings.tool_mode,
        medgym_version=medgym_version(),
        **episode,
    )


def case_header(case: Case, settings: RunSettings, question: str, image: str | None, prior_image: str | None):
    """The header of an episode on a case with a known answer."""
    return episode_header(
        settings,
        question,
        image,
        source=case.source,
        seed=case.seed,
        case_id=case.case_id,
        stage=case.stage,
        template=case.template,
        answer=case.answer,
        answer_type=case.answer_type,
        choices=case.choices,
        answer_box=case.answer_box,
        prior_image=prior_image,
        study_hash=case.study.content_hash(),
        unit=case.unit,
        tolerance=case.tolerance,
        abs_tolerance=case.abs_tolerance,
    )


def open_header(
    settings: RunSettings, question: str, image: str | None, source: str, case_id: str, seed: int | None, study_hash
):
    """The header of a question with no known answer (a chat over an upload): an unscored 'open' question."""
    return episode_header(
        settings,
        question,
        image,
        source=source,
        seed=seed,
        case_id=case_id,
        stage="chat",
        template="chat",
        answer="",
        answer_type="open",
        study_hash=study_hash,
    )


class EpisodeRecorder:
    """Collects one episode's steps and writes it (sealed, append-only) when it closes."""

    def __init__(self, writer: TraceWriter, header: TraceHeader):
        self.writer = writer
        self.episode = TraceEpisode(header=header)
        self.closed = False
        self._pending: list[tuple[int, list[CallRecord], list[list[str]] | None]] = []

    @classmethod
    def for_case(
        cls, writer: TraceWriter, case: Case, settings: RunSettings, question: str, images: list[np.ndarray]
    ) -> EpisodeRecorder:
        store = writer.images
        image = store.put(images[0]) if images else None
        prior = store.put(images[1]) if len(images) > 1 else None
        return cls(writer, case_header(case, settings, question, image, prior))

    def step(
        self,
        model_text: str,
        records: list[CallRecord] | None = None,
        reward: float = 0.0,
        image_hashes: list[list[str]] | None = None,
        **fields: Any,
    ) -> None:
        """Append a model turn with the calls it made.

        Images are hashed and stored when the episode closes, not here: content hashing and PNG
        encoding stay off the step's critical path (the step keeps its arrays until then).
        """
        records = list(records or [])
        steps = self.episode.steps
        steps.append(TraceStep(index=len(steps), model_text=model_text, calls=[], reward=reward, **fields))
        self._pending.append((len(steps) - 1, records, image_hashes))

    def _materialise(self) -> None:
        """Turn the kept call records into trace records (images stored by content hash)."""
        store = self.writer.images
        for index, records, hashes in self._pending:
            calls = [r.to_trace(store, hashes[i] if hashes is not None else None) for i, r in enumerate(records)]
            self.episode.steps[index] = self.episode.steps[index].model_copy(update={"calls": calls})
        self._pending = []

    def add_step(self, model_text: str, calls: list[ToolCallRecord], reward: float = 0.0, **fields: Any) -> None:
        """Append a model turn whose calls are already trace records (a chat's stored tool messages)."""
        steps = self.episode.steps
        steps.append(TraceStep(index=len(steps), model_text=model_text, calls=calls, reward=reward, **fields))

    def close(
        self,
        truncated: bool,
        answer: str | None = None,
        box: list[float] | None = None,
        score: dict[str, Any] | None = None,
        reward: float = 0.0,
    ) -> TraceEpisode | None:
        """Write the episode once; later calls do nothing."""
        if self.closed:
            return None
        self.closed = True
        self._materialise()
        episode = self.episode.model_copy(
            update={
                "final_answer": answer,
                "final_box": box,
                "score": score or {},
                "reward": reward,
                "truncated": truncated,
            }
        )
        return self.writer.write(episode)
