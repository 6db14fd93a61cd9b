"""The TRL bridge: medgym's tools as methods of an ``environment_factory`` environment.

TRL's ``GRPOTrainer(environment_factory=...)`` makes one environment per rollout, calls
``reset(**row)`` with the dataset row, exposes every public method as a tool (its JSON
schema comes from the type hints and the Google docstring) and calls the method with the
model's arguments. :class:`MedGymToolEnv` gets those methods *generated* from
:data:`medgym.tools.TOOLS`: signature and docstring are derived from each tool's pydantic
input model, and the call delegates to :func:`medgym.tools.run_tool` -- there is no second
schema to keep in sync.

A tool method returns ``[{"type": "image", "image": PIL}, ..., {"type": "text", "text": ...}]``
when the tool made pictures (TRL feeds them back to the VLM) and the text alone otherwise.
Bad arguments come back as the tool's error text, which the model can read.
"""

from __future__ import annotations

import inspect
import logging
import time
import typing
from dataclasses import dataclass
from typing import Any

from medgym.environments.case import Case
from medgym.environments.sources import make_source
from medgym.rl.conversation import POLICY_IMAGE_SIZE, policy_image, tool_text
from medgym.tools import TOOLS, ToolContext, ToolSpec, run_tool

log = logging.getLogger(__name__)


@dataclass
class CallRecord:
    """One tool call the bridge ran during a rollout."""

    name: str
    arguments: dict[str, Any]
    ok: bool
    n_images: int
    seconds: float = 0.0  # the tool's run plus turning its pictures into policy images


def _plain_hint(hint: Any) -> Any:
    """Strip ``Annotated`` (pydantic constraints) so transformers' schema parser understands the hint."""
    return typing.get_type_hints(type("_H", (), {"__annotations__": {"x": hint}}))["x"]


def _docstring(spec: ToolSpec) -> str:
    lines = [spec.description, "", "Args:"]
    for name, field in spec.input_model.model_fields.items():
        desc = " ".join((field.description or name).split())
        lines.append(f"    {name}: {desc}")
    lines += ["", "Returns:", "    The tool's result: text, with the pictures it made (if any) before it."]
    return "\n".join(lines)


def tool_method(spec: ToolSpec):
    """A method ``(self, **arguments)`` for one tool, with the signature and docstring TRL reads."""

    def method(self: MedGymToolEnv, **arguments: Any) -> list[dict[str, Any]] | str:
        return self._call(spec.name, arguments)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    annotations: dict[str, Any] = {}
    for name, field in spec.input_model.model_fields.items():
        hint = _plain_hint(field.annotation)
        default = inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint))
        annotations[name] = hint
    annotations["return"] = list[dict[str, Any]] | str
    method.__name__ = method.__qualname__ = spec.name
    method.__doc__ = _docstring(spec)
    method.__signature__ = inspect.Signature(params, return_annotation=annotations["return"])  # type: ignore[attr-defined]
    method.__annotations__ = annotations
    return method


class MedGymToolEnv:
    """One rollout's environment: the case's tool context and a record of the calls made.

    ``reset(**row)`` reads ``case_seed`` (and ``source``, default ``phantom``) from the row.
    ``tool_calls_ok`` counts calls that ran without error, the input of the tool-use bonus.
    """

    def __init__(self, segmenter: str = "threshold", image_size: int = POLICY_IMAGE_SIZE, max_images: int = 4):
        self.segmenter = segmenter
        self.image_size = image_size
        self.max_images = max_images
        self._sources: dict[str, Any] = {}
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
        start_case(self, self._sources[source, stages].case(int(row["case_seed"])))
        return None

    @property
    def tool_calls_ok(self) -> int:
        return sum(c.ok for c in self.calls)

    def _call(self, name: str, arguments: dict[str, Any]) -> list[dict[str, Any]] | str:
        if self.ctx is None:
            raise RuntimeError("reset() the environment before calling its tools")
        t0 = time.perf_counter()
        result = run_tool(TOOLS, name, arguments, self.ctx)
        pictures = [policy_image(img, self.image_size) for img in result.images[: self.max_images]]
        seconds = time.perf_counter() - t0
        self.calls.append(
            CallRecord(
                name=name, arguments=dict(arguments), ok=not result.error, n_images=len(pictures), seconds=seconds
            )
        )
        text = tool_text(name, result)
        if not pictures:
            return text
        return [*({"type": "image", "image": p} for p in pictures), {"type": "text", "text": text}]


def stage_source(source: str, stages: list[str] | None = None):
    """The named task source, drawing only from ``stages`` when given (a seed then names another case)."""
    return make_source(source, **({"stages": stages} if stages else {}))


def start_case(env: MedGymToolEnv, case: Case) -> None:
    """Point the environment's tools at ``case`` and forget earlier calls (what ``reset`` does once it has the case).

    A module function, not a method: every public method of the environment becomes a tool.
    """
    env.case = case
    env.ctx = ToolContext(study=case.study, prior=case.prior, segmenter=env.segmenter)
    env.calls = []


def ok_calls_among_first(env: MedGymToolEnv, k: int) -> int:
    """Successful calls among the first ``k`` of a rollout (the ones whose results the model actually saw).

    A module function, not a method: every public method of the environment becomes a tool.
    """
    return sum(c.ok for c in env.calls[:k])


for _name, _spec in TOOLS.items():
    setattr(MedGymToolEnv, _name, tool_method(_spec))

__all__ = ["CallRecord", "MedGymToolEnv", "ok_calls_among_first", "stage_source", "start_case", "tool_method"]
