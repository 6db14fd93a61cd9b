"""The one model-facing contract: tool schemas, the system prompt, and the messages a policy reads.

Every runtime — the env with :func:`medgym.environments.evaluate.evaluate`, the agent graph, the
TRL bridge and chat — shows a model the same things, built here:

- :func:`tool_schemas`: the tools in the OpenAI / Hermes function format. They are derived from
  the very methods the TRL bridge exposes (:func:`tool_method`, one per registered tool, with
  the type-hinted signature and Google docstring TRL reads), through ``transformers``'
  ``get_json_schema`` — the function TRL itself applies to ``environment_factory`` methods — so
  training, chat and evaluation cannot show a model two different tool blocks. Tools reach a chat
  template only through ``tools=``; the system prompt never lists them.
- :func:`system_prompt`: ``prompts/system.jinja`` for a tool mode.
- the messages: ``{"role", "content", "images", "name"}`` dicts (``images`` are RGB uint8 arrays);
  :func:`question_messages` opens an episode, :func:`tool_messages` turns call records into
  ``tool`` turns (``"[name] text"`` and the call's images), :func:`limit_images` applies one image
  budget. Backends turn these into their API's format (chat template, OpenAI messages).
"""

from __future__ import annotations

import hashlib
import inspect
import typing
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from medgym import prompts
from medgym.environments.case import Case
from medgym.tools import TOOLS, Study, ToolSpec
from medgym.tools.base import TOOL_MODES, ToolMode
from medgym.tools.imaging import to_display

if TYPE_CHECKING:
    from medgym.environments.runner import CallRecord

DEFAULT_TOOL_MODE: ToolMode = "predicted"
ERR_TOOL_MODE = "unknown tool mode {mode!r}: choose 'predicted' (no tool reads ground truth) or 'oracle' (upper bound)."
NOTE_IMAGES_DROPPED = "({n} more image(s) not shown: at most {k} per turn.)"
NOTE_EARLIER_IMAGES = "\n({n} earlier image(s) not shown again.)"
# The turn budget's last turn: the loop tells the policy, and a constrained backend admits only an answer.
LAST_TURN_KIND = "last_turn"
NOTE_LAST_TURN = "This is your last turn: answer now with <answer>...</answer> from what you have seen."

Message = dict[str, Any]


def check_tool_mode(mode: str) -> ToolMode:
    """The mode, or a ValueError naming the choices."""
    if mode not in TOOL_MODES:
        raise ValueError(ERR_TOOL_MODE.format(mode=mode))
    return mode  # type: ignore[return-value]


# ----------------------------------------------------------------------------- tool schemas


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
    """A method ``(self, **arguments)`` for one tool, with the signature and docstring TRL reads.

    The method calls ``self._call_tool(name, arguments)`` (private: TRL makes every public method a tool).
    """

    def method(self: Any, **arguments: Any) -> list[dict[str, Any]] | str:
        return self._call_tool(spec.name, arguments)

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


@cache
def _schemas() -> tuple[str, ...]:
    import json

    from transformers.utils import get_json_schema

    # Sorted by name: TRL lists an environment's methods in dir() order.
    return tuple(json.dumps(get_json_schema(tool_method(TOOLS[name]))) for name in sorted(TOOLS))


def tool_schemas(brief: bool = False) -> list[dict[str, Any]]:
    """The tools as every model sees them (``tools=`` of a chat template or an OpenAI request).

    ``brief``: the same tools, arguments, types, enums and required arguments without the prose
    (descriptions, nullability, the return's schema) -- a third of the tokens, for a small policy
    trained on the tools' use, for which the prose is the same ~900 tokens before every conversation.

    >>> [s["function"]["name"] for s in tool_schemas()]
    ['detect', 'measure', 'retrieve', 'segment', 'window', 'zoom']
    >>> tool_schemas(brief=True)[2]["function"]
    {'name': 'retrieve', 'parameters': {'type': 'object', 'properties': {'query': {'type': 'string'}, 'k': {'type': 'integer'}}, 'required': ['query']}}
    """
    import json

    schemas = [json.loads(s) for s in _schemas()]
    return [{"type": s["type"], "function": _brief(s["function"])} for s in schemas] if brief else schemas


_PROSE = frozenset({"description", "nullable", "return", "additionalProperties"})


def _brief(schema: Any) -> Any:
    """A JSON schema without its prose keys, at every depth (a property *named* like one stays)."""
    if isinstance(schema, dict):
        return {
            k: ({n: _brief(v) for n, v in schema[k].items()} if k == "properties" else _brief(schema[k]))
            for k in schema
            if k not in _PROSE
        }
    return [_brief(v) for v in schema] if isinstance(schema, list) else schema


# ----------------------------------------------------------------------------- system prompt


def system_prompt(tool_mode: str = DEFAULT_TOOL_MODE) -> str:
    """The system prompt for a tool mode (no tool list: tools travel through ``tools=``)."""
    return prompts.render("system", tool_mode=check_tool_mode(tool_mode)).rstrip("\n")


def prompt_hash(tool_mode: str = DEFAULT_TOOL_MODE) -> str:
    """Hash of what a model is prompted with: the system prompt and the tool schemas."""
    h = hashlib.sha256(system_prompt(tool_mode).encode())
    for s in _schemas():
        h.update(s.encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the question


def describe_study(study: Study, has_prior: bool = False, tool_mode: str = DEFAULT_TOOL_MODE) -> list[str]:
    """What the model is told about the picture: size, spacing, volume; structure names only in oracle mode."""
    h, w = study.shape2d
    row_mm, col_mm = study.spacing2d
    desc = f"{study.modality} image, {w} x {h} pixels, pixel spacing {col_mm:.3f} x {row_mm:.3f} mm"
    if not study.meta.get("spacing_known", True):
        desc += " (not given in the file: assumed, so sizes are in pixels)"
    if study.is_3d:
        desc += f"; a volume of {study.image.shape[0]} slices {study.spacing[0]:g} mm apart, slice {study.display_slice} shown"
    lines = [desc + "."]
    if has_prior:
        lines.append("Image 1 is the current study, image 2 the prior study.")
    if check_tool_mode(tool_mode) == "oracle":
        names = [n for n in study.structures if not n.startswith("lesion_") and n != "empty"]
        if names:
            lines.append("Structures segment can name: " + ", ".join(names) + ".")
    return lines


def question_text(case: Case, tool_mode: str = DEFAULT_TOOL_MODE) -> str:
    """The first observation's text: the study described, then the question with its answer format."""
    return "\n".join([*describe_study(case.study, case.prior is not None, tool_mode), case.prompt()])


def question_images(case: Case) -> list[np.ndarray]:
    """The pictures shown with the question: the current study, then the prior if any."""
    pics = [to_display(case.study.plane(), case.study.modality)]
    if case.prior is not None:
        pics.append(to_display(case.prior.plane(), case.prior.modality))
    return pics


def question_messages(text: str, images: list[np.ndarray], tool_mode: str = DEFAULT_TOOL_MODE) -> list[Message]:
    """The opening of an episode: the system prompt, then the question with its pictures."""
    return [
        {"role": "system", "content": system_prompt(tool_mode), "images": []},
        {"role": "user", "content": text, "images": list(images), "kind": "question"},
    ]


def case_messages(case: Case, tool_mode: str = DEFAULT_TOOL_MODE) -> list[Message]:
    return question_messages(question_text(case, tool_mode), question_images(case), tool_mode)


# ----------------------------------------------------------------------------- tool turns


def tool_messages(records: list[CallRecord], max_images: int | None = None) -> list[Message]:
    """One ``tool`` message per call record; at most ``max_images`` pictures over the turn (in call order)."""
    out: list[Message] = []
    left = max_images
    for r in records:
        images = r.images if left is None else r.images[: max(0, left)]
        dropped = len(r.images) - len(images)
        if left is not None:
            left -= len(images)
        text = r.observation + ("\n" + NOTE_IMAGES_DROPPED.format(n=dropped, k=max_images) if dropped else "")
        out.append(
            {
                "role": "tool",
                "kind": "tool",
                "name": r.name,
                "content": text,
                "images": images,
                # What scripted policies and the UI read; chat templates see only content and images.
                "arguments": r.arguments,
                "text": r.text,
                "data": r.data,
                "error": r.error,
            }
        )
    return out


def limit_images(messages: list[Message], max_images: int) -> list[Message]:
    """The image budget of a model's view: the question's pictures always, then the most recent others.

    Older pictures beyond the budget are left out and named in their message's text instead.
    """
    first_q = next((i for i, m in enumerate(messages) if m["role"] == "user" and m.get("images")), None)
    budget = max(0, max_images - (len(messages[first_q]["images"]) if first_q is not None else 0))
    keep: set[tuple[int, int]] = set()
    for i in range(len(messages) - 1, -1, -1):
        if i == first_q:
            continue
        for j in range(len(messages[i].get("images") or []) - 1, -1, -1):
            if budget > 0:
                keep.add((i, j))
                budget -= 1
    out = []
    for i, m in enumerate(messages):
        pics = m.get("images") or []
        if i == first_q or all((i, j) in keep for j in range(len(pics))):
            out.append(m)
            continue
        kept = [p for j, p in enumerate(pics) if (i, j) in keep]
        dropped = len(pics) - len(kept)
        out.append({**m, "images": kept, "content": m["content"] + NOTE_EARLIER_IMAGES.format(n=dropped)})
    return out
