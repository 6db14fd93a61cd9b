"""check_tool: the executable tool contract, in the spirit of Gymnasium's check_env.

It proves a registered tool honours the API: the schema round-trips and describes
every field, the function's signature matches the input model, results are
deterministic, and bad input (unknown field, wrong type, NaN, the tool's own bad
examples such as a box outside the image or an empty mask) comes back as a readable
error result instead of an exception.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import typing
from collections.abc import Callable
from typing import Any

from medgym.tools.base import ToolContext, ToolResult, ToolSpec


class ToolCheckError(AssertionError):
    """A tool breaks the contract; the message lists every problem found."""


def _numeric_fields(spec: ToolSpec) -> list[str]:
    props = spec.input_model.model_json_schema().get("properties", {})
    out = []
    for name, prop in props.items():
        kinds = {prop.get("type")} | {p.get("type") for p in prop.get("anyOf", [])}
        if kinds & {"number", "integer"}:
            out.append(name)
    return out


def check_tool(spec: ToolSpec, make_ctx: Callable[[], ToolContext]) -> list[str]:
    """Check one tool; returns the checks run. Raises ToolCheckError listing failures.

    ``make_ctx`` builds a fresh context (a study with ``lesion_1``, ``body`` and an all-empty
    ``empty`` structure) so no check sees another's masks.
    """
    problems: list[str] = []
    done: list[str] = []

    # 1. Schema: JSON-serialisable, every field described, names match the model.
    schema = spec.json_schema()
    json.loads(json.dumps(schema))
    params = schema["function"]["parameters"]
    fields = set(spec.input_model.model_fields)
    if set(params.get("properties", {})) != fields:
        problems.append(f"schema properties {sorted(params.get('properties', {}))} != model fields {sorted(fields)}")
    for name, field in spec.input_model.model_fields.items():
        if not field.description:
            problems.append(f"field {name!r} has no description; the model cannot know what it means")
    if not spec.description:
        problems.append("tool has no description")
    if spec.input_model.model_config.get("extra") != "forbid":
        problems.append("input model must set extra='forbid'")
    done.append("schema")

    # 2. Signature: fn(args: InputModel, ctx: ToolContext) -> ToolResult.
    names = {spec.input_model.__name__: spec.input_model, "ToolContext": ToolContext, "ToolResult": ToolResult}
    hints = typing.get_type_hints(spec.fn, localns=names)
    sig = list(inspect.signature(spec.fn).parameters)
    if len(sig) != 2 or hints.get(sig[0]) is not spec.input_model or hints.get(sig[1]) is not ToolContext:
        problems.append(f"signature must be fn(args: {spec.input_model.__name__}, ctx: ToolContext); got {sig}")
    if hints.get("return") is not ToolResult:
        problems.append("fn must be annotated to return ToolResult")
    done.append("signature")

    if not spec.examples:
        problems.append("spec has no examples to exercise it with")

    # 3. Round trip and determinism on every example.
    for example in spec.examples:
        parsed = spec.parse(copy.deepcopy(example))
        if isinstance(parsed, ToolResult):
            problems.append(f"example {example} does not validate: {parsed.text}")
            continue
        again = spec.input_model.model_validate_json(parsed.model_dump_json())
        if again != parsed:
            problems.append(f"example {example} does not round-trip through JSON")
        try:
            first, second = spec.run(example, make_ctx()), spec.run(example, make_ctx())
        except Exception as exc:  # noqa: BLE001 - a valid example must not raise
            problems.append(f"example {example} raised {type(exc).__name__}: {exc}")
            continue
        if first.error:
            problems.append(f"example {example} gave an error: {first.text}")
        if first.fingerprint() != second.fingerprint():
            problems.append(f"example {example} is not deterministic")
        for img in first.images:
            if img.dtype.name != "uint8" or img.ndim != 3 or img.shape[2] != 3:
                problems.append(
                    f"example {example} returned an image that is not RGB uint8 (got {img.dtype}, {img.shape})"
                )
        json.dumps(first.data)
    done += ["round-trip", "determinism"]

    # 4. Bad input is an error result, never an exception.
    bad: list[Any] = ["not json", [1, 2], None if spec.input_model.model_fields else {"x": 1}]
    if spec.examples:
        base = spec.examples[0]
        bad.append({**base, "no_such_field": 1})
        first_field = next(iter(base or spec.input_model.model_fields), None)
        if first_field is not None:
            bad.append({**base, first_field: {"wrong": "type"}})
        for name in _numeric_fields(spec):
            bad.append({**base, name: math.nan})
    bad += list(spec.bad_examples)
    for args in bad:
        if args is None:
            continue
        try:
            result = spec.run(copy.deepcopy(args), make_ctx())
        except Exception as exc:  # noqa: BLE001 - the contract is exactly "never raise"
            problems.append(f"bad input {args!r} raised {type(exc).__name__}: {exc}")
            continue
        if not result.error:
            problems.append(f"bad input {args!r} was accepted: {result.text[:120]}")
        elif not result.text.startswith("Error"):
            problems.append(f"error text for {args!r} should start with 'Error': {result.text[:120]}")
    done.append("bad-input")

    if problems:
        raise ToolCheckError(f"tool {spec.name!r} fails its contract:\n- " + "\n- ".join(problems))
    return done
