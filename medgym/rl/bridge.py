"""The TRL bridge: medgym's tools as methods of an ``environment_factory`` environment.

TRL's ``GRPOTrainer(environment_factory=...)`` makes one environment per rollout, calls
``reset(**row)`` with the dataset row, exposes every public method as a tool (its JSON
schema comes from the type hints and the Google docstring) and calls the method with the
model's arguments. :class:`MedGymToolEnv` gets those methods from the contract's
:func:`medgym.environments.contract.tool_method` — the same methods whose schemas every other
runtime shows (:func:`~medgym.environments.contract.tool_schemas`) — and each call goes through
the one call runner (:func:`medgym.environments.runner.run_call`).

A tool method returns ``[{"type": "image", "image": PIL}, ..., {"type": "text", "text": ...}]``
when the tool made pictures (TRL feeds them back to the VLM) and the text alone otherwise;
the text is the contract's ``"[name] text"``. Bad arguments come back as the tool's error
text, which the model can read.

With ``record_to``, every rollout is written as a trace through the one episode recorder
(off by default for speed): the tool calls as they ran, then the answer when the reward
function hands the completion to :func:`finish_rollout`. Such traces replay with
``medgym replay --verify`` like any other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from medgym.environments.case import Case
from medgym.environments.contract import DEFAULT_TOOL_MODE, check_tool_mode, question_images, question_text, tool_method
from medgym.environments.parsing import completion_text, parse_action
from medgym.environments.recorder import EpisodeRecorder, RunSettings
from medgym.environments.rewards import score_parts, total_reward
from medgym.environments.runner import CallRecord, run_call
from medgym.environments.sources import make_source
from medgym.rl.conversation import POLICY_IMAGE_SIZE, policy_image
from medgym.tools import TOOLS, ToolContext

log = logging.getLogger(__name__)


class MedGymToolEnv:
    """One rollout's environment: the case's tool context and a record of the calls made.

    ``reset(**row)`` reads ``case_seed`` (and ``source``, default ``phantom``; ``stages``) from the row.
    ``tool_calls_ok`` counts calls that ran without error, the input of the tool-use bonus.
    """

    def __init__(
        self,
        segmenter: str = "threshold",
        image_size: int = POLICY_IMAGE_SIZE,
        max_images: int = 4,
        tool_mode: str = DEFAULT_TOOL_MODE,
        record_to: str | Path | None = None,
        model_id: str = "grpo-rollout",
    ):
        self.segmenter = segmenter
        self.image_size = image_size
        self.max_images = max_images
        self.tool_mode = check_tool_mode(tool_mode)
        self.model_id = model_id
        self._sources: dict[Any, Any] = {}
        self._writer = None
        if record_to is not None:
            from medgym.traces import TraceWriter

            self._writer = TraceWriter(record_to)
        self._recorder: EpisodeRecorder | None = None
        self._source_key: tuple[str, tuple[str, ...]] = ("phantom", ())
        self.case: Case | None = None
        self.ctx: ToolContext | None = None
        self.calls: list[CallRecord] = []

    def reset(self, **row: Any) -> None:
        """Start a rollout on the row's case; the prompt already holds the question, so nothing is appended."""
        source = str(row.get("source") or "phantom")
        stages = tuple(row.get("stages") or ())  # a stage-restricted source draws other cases per seed
        if "case_seed" not in row:
            raise ValueError("a GRPO dataset row needs a 'case_seed' column naming its case")
        if (source, stages) not in self._sources:
            self._sources[source, stages] = stage_source(source, list(stages))
        self._source_key = (source, stages)
        start_case(self, self._sources[source, stages].case(int(row["case_seed"])))
        if row.get("tool_context") is not None:  # the prompt's calls already ran (an evidence prompt): their state
            self.ctx = snapshot_context(row["tool_context"])
        return None

    @property
    def tool_calls_ok(self) -> int:
        return sum(c.ok for c in self.calls)

    def _call_tool(self, name: str, arguments: dict[str, Any]) -> list[dict[str, Any]] | str:
        if self.ctx is None:
            raise RuntimeError("reset() the environment before calling its tools")
        record = run_call(name, dict(arguments), self.ctx)
        record.images = record.images[: self.max_images]
        pictures = [policy_image(img, self.image_size) for img in record.images]
        self.calls.append(record)
        if self._recorder is not None:
            call = json.dumps({"name": name, "arguments": record.arguments}, default=str)
            self._recorder.step(f"<tool_call>{call}</tool_call>", [record])
        if not pictures:
            return record.observation
        return [*({"type": "image", "image": p} for p in pictures), {"type": "text", "text": record.observation}]


for _name, _spec in TOOLS.items():
    setattr(MedGymToolEnv, _name, tool_method(_spec))


def snapshot_context(ctx: ToolContext) -> ToolContext:
    """A copy of a tool context that later calls can extend without touching the original: its own mask and
    candidate tables (the arrays are shared; no tool edits a mask in place)."""
    return dataclasses.replace(
        ctx, masks=dict(ctx.masks), candidates={study: list(found) for study, found in ctx.candidates.items()}
    )


def stage_source(source: str, stages: list[str] | None = None):
    """The named task source, drawing only from ``stages`` when given (a seed then names another case)."""
    return make_source(source, **({"stages": stages} if stages else {}))


def start_case(env: MedGymToolEnv, case: Case) -> None:
    """Point the environment's tools at ``case`` and forget earlier calls (what ``reset`` does once it has the case).

    A module function, not a method: every public method of the environment becomes a tool.
    """
    if env._recorder is not None:  # a rollout that never reached its reward: truncated
        env._recorder.close(truncated=True)
    env.case = case
    env.ctx = ToolContext(study=case.study, prior=case.prior, segmenter=env.segmenter, tool_mode=env.tool_mode)
    env.calls = []
    env._recorder = None
    if env._writer is not None:
        source, stages = env._source_key
        settings = RunSettings(
            source_spec=source,
            source_config={"stages": list(stages)} if stages else {},
            segmenter=env.segmenter,
            tool_mode=env.tool_mode,
            model_id=env.model_id,
        )
        text = question_text(case, env.tool_mode)
        env._recorder = EpisodeRecorder.for_case(env._writer, case, settings, text, question_images(case))


def finish_rollout(env: MedGymToolEnv, completion: Any) -> None:
    """Record the rollout's final turn and close its trace (a no-op when the env does not record).

    A module function, not a method: every public method of the environment becomes a tool.
    """
    if env._recorder is None or env.case is None:
        return
    text = completion_text(completion)
    action = parse_action(text)
    parts = score_parts(text, env.case.reward_columns(), env.tool_calls_ok)
    reward = total_reward(parts)
    env._recorder.step(text, [], reward=reward, answer=action.answer, box=action.box, format_error=action.error)
    env._recorder.close(
        truncated=action.answer is None, answer=action.answer, box=action.box, score=parts, reward=reward
    )
    env._recorder = None


def ok_calls_among_first(env: MedGymToolEnv, k: int) -> int:
    """Successful calls among the first ``k`` of a rollout (the ones whose results the model actually saw).

    A module function, not a method: every public method of the environment becomes a tool.
    """
    return sum(c.ok for c in env.calls[:k])


__all__ = [
    "CallRecord",
    "MedGymToolEnv",
    "finish_rollout",
    "ok_calls_among_first",
    "snapshot_context",
    "stage_source",
    "start_case",
]
