"""The tool API: studies, the runtime context, results, specs and the registry contract.

A tool is a pydantic input model (``extra="forbid"``, every field described), a
function ``fn(args, ctx) -> ToolResult`` and a :class:`ToolSpec` in the plain-dict
registry of :mod:`medgym.tools`. Everything the model never sees (the images, the
pixel spacing, cached models, masks made earlier in the episode) arrives through
:class:`ToolContext`.

Bad model input is *returned* as an error result the model can read; only genuine
bugs raise. Tools signal bad input by raising :class:`ToolInputError`, which
:meth:`ToolSpec.run` turns into such a result.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medgym import TOOL_MODES  # noqa: F401  (re-exported: the one list of tool modes)

log = logging.getLogger(__name__)

# Error texts are module constants so tests (and models) can rely on them verbatim.
ERR_UNKNOWN_TOOL = "Error: unknown tool {name!r}. Call one of: {names}."
ERR_INVALID_ARGS = (
    "Error: invalid arguments for {name}: {details}. Fix the arguments to match the tool's schema and call it again."
)
ERR_BAD_INPUT = "Error in {name}: {details}"
ERR_PREDICTED_NAME = (
    "{name!r} is not available in predicted mode: segment it from a box or point first "
    "(no tool reads the case's ground truth; an automatic segmenter is not installed)."
)
ERR_NOT_JSON = 'Error: the arguments of {name} are not a JSON object: {details}. Write them as {{"key": value, ...}}.'

StudyName = Literal["current", "prior"]
ToolMode = Literal["predicted", "oracle"]


class ToolInputError(ValueError):
    """Raised by a tool for input the model can fix (box outside the image, empty mask)."""


class ToolArgs(BaseModel):
    """Base of every tool's input model: unknown fields and NaN/inf are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


BoxField = Field(
    description="Box [x0, y0, x1, y1] in pixel coordinates of the original image "
    "(x is the column, y the row; x0 < x1, y0 < y1).",
    min_length=4,
    max_length=4,
)
SliceField = Field(
    default=None,
    description="Axial slice index for 3D volumes; omit to use the slice shown in the question.",
)
StudyField = Field(default="current", description="Which study to use: 'current' or 'prior' (follow-up cases).")


@dataclass
class Study:
    """One image with its geometry and labelled structures.

    ``image`` is (H, W) or (Z, H, W) in numpy axis order, CT in Hounsfield units;
    ``spacing`` is in mm per pixel along the same axes; ``structures`` maps names
    (``liver``, ``lesion_1`` ...) to boolean masks of the image's shape.
    """

    image: np.ndarray
    spacing: tuple[float, ...]
    modality: str = "CT"
    structures: dict[str, np.ndarray] = field(default_factory=dict)
    display_slice: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim not in (2, 3):
            raise ValueError(f"image must be 2D or 3D, got shape {self.image.shape}")
        if len(self.spacing) != self.image.ndim:
            raise ValueError(f"spacing {self.spacing} must have one value per image axis {self.image.shape}")
        for name, mask in self.structures.items():
            if mask.shape != self.image.shape:
                raise ValueError(f"structure {name!r} has shape {mask.shape}, image {self.image.shape}")
        if self.image.ndim == 3 and self.display_slice is None:
            self.display_slice = self.image.shape[0] // 2

    @property
    def is_3d(self) -> bool:
        return self.image.ndim == 3

    @property
    def shape2d(self) -> tuple[int, int]:
        return tuple(self.image.shape[-2:])  # type: ignore[return-value]

    @property
    def spacing2d(self) -> tuple[float, float]:
        return (float(self.spacing[-2]), float(self.spacing[-1]))

    def resolve_slice(self, slice_index: int | None) -> int | None:
        """The slice a 2D operation works on (None for 2D studies)."""
        if not self.is_3d:
            return None
        z = self.display_slice if slice_index is None else slice_index
        if not 0 <= z < self.image.shape[0]:
            raise ToolInputError(f"slice_index {z} is outside the volume (0..{self.image.shape[0] - 1}).")
        return z

    def plane(self, slice_index: int | None = None) -> np.ndarray:
        """The 2D image a box refers to."""
        z = self.resolve_slice(slice_index)
        return self.image if z is None else self.image[z]

    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.image).tobytes())
        h.update(repr((self.image.shape, self.spacing)).encode())
        return h.hexdigest()[:16]


@dataclass
class ToolContext:
    """What a tool may use that the model never passes: studies, masks, models."""

    study: Study
    prior: Study | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    # The candidates the last ``detect`` call listed, per study ("current", "prior"): segment takes one by number.
    candidates: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    segmenter: str = "medsam"
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_b"
    # "predicted": no tool reads ground truth (structures); "oracle": tools may (an upper bound).
    tool_mode: ToolMode = "predicted"

    def __post_init__(self) -> None:
        if self.tool_mode not in TOOL_MODES:
            raise ValueError(f"tool_mode must be one of {TOOL_MODES}, got {self.tool_mode!r}")

    @property
    def oracle(self) -> bool:
        return self.tool_mode == "oracle"

    def get_study(self, which: str = "current") -> Study:
        if which == "prior":
            if self.prior is None:
                raise ToolInputError("this case has no prior study; use study='current'.")
            return self.prior
        return self.study

    def new_mask_id(self) -> str:
        return f"mask_{len(self.masks) + 1}"


@dataclass
class ToolResult:
    """What a tool returns: text for the model, images to show it, data for rewards/traces."""

    text: str
    images: list[np.ndarray] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    error: bool = False

    def fingerprint(self) -> str:
        """Content hash over text, data and image pixels (used for determinism checks)."""
        h = hashlib.sha256(self.text.encode())
        h.update(json.dumps(self.data, sort_keys=True, default=str).encode())
        for img in self.images:
            h.update(np.ascontiguousarray(img).tobytes())
        return h.hexdigest()


def error_result(text: str) -> ToolResult:
    return ToolResult(text=text, error=True)


@dataclass(frozen=True)
class ToolSpec:
    """One registered tool: its schema, its function and how to check it.

    ``examples`` are valid argument sets on the standard check context (a phantom CT
    slice with a ``lesion_1`` structure); ``bad_examples`` are arguments that must give
    an error result (box outside the image, empty mask ...).
    """

    name: str
    description: str
    input_model: type[ToolArgs]
    fn: Callable[[Any, ToolContext], ToolResult]
    version: str = "1"
    examples: tuple[dict[str, Any], ...] = ()
    bad_examples: tuple[dict[str, Any], ...] = ()

    def json_schema(self) -> dict[str, Any]:
        """The function schema shown to the model (OpenAI / Hermes tool format)."""
        params = self.input_model.model_json_schema()
        params.pop("title", None)
        for prop in params.get("properties", {}).values():
            prop.pop("title", None)
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": params},
        }

    def parse(self, arguments: dict[str, Any] | str | None) -> ToolArgs | ToolResult:
        """Validate raw arguments; an error result on failure."""
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                return error_result(ERR_NOT_JSON.format(name=self.name, details=exc.msg))
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return error_result(ERR_NOT_JSON.format(name=self.name, details=type(arguments).__name__))
        try:
            return self.input_model.model_validate(arguments)
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in exc.errors()
            )
            return error_result(ERR_INVALID_ARGS.format(name=self.name, details=details))

    def run(self, arguments: dict[str, Any] | str | None, ctx: ToolContext) -> ToolResult:
        """Validate and run; bad input comes back as an error result, bugs raise."""
        parsed = self.parse(arguments)
        if isinstance(parsed, ToolResult):
            return parsed
        try:
            return self.fn(parsed, ctx)
        except ToolInputError as exc:
            return error_result(ERR_BAD_INPUT.format(name=self.name, details=exc))


def run_tool(registry: dict[str, ToolSpec], name: str, arguments: Any, ctx: ToolContext) -> ToolResult:
    """Run a tool by name from a registry; an unknown name is an error result."""
    spec = registry.get(name) if isinstance(name, str) else None
    if spec is None:
        return error_result(ERR_UNKNOWN_TOOL.format(name=name, names=", ".join(sorted(registry))))
    return spec.run(arguments, ctx)


def check_box(box: list[float], shape2d: tuple[int, int]) -> tuple[int, int, int, int]:
    """Validate a model box against an image plane; integer pixel bounds, end exclusive."""
    x0, y0, x1, y1 = box
    h, w = shape2d
    if not (x0 < x1 and y0 < y1):
        raise ToolInputError(f"box {box} is empty: need x0 < x1 and y0 < y1.")
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        raise ToolInputError(
            f"box {box} lies outside the image (width {w}, height {h}); use coordinates within [0, {w}] x [0, {h}]."
        )
    xi0, yi0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    xi1, yi1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
    return xi0, yi0, xi1, yi1


NON_ORGAN_STRUCTURES = ("body", "empty")


def organ_names(structures: dict[str, np.ndarray]) -> list[str]:
    """Names of the organ structures of a study (not lesions, not the body outline)."""
    return [n for n in sorted(structures) if not n.startswith("lesion") and n not in NON_ORGAN_STRUCTURES]


def organ_of(mask: np.ndarray, structures: dict[str, np.ndarray]) -> str | None:
    """The organ holding most of a mask; None when no organ overlaps it."""
    overlap = {n: int(np.count_nonzero(mask & structures[n])) for n in organ_names(structures)}
    best = max(overlap, key=lambda n: overlap[n], default=None)
    return best if best is not None and overlap[best] > 0 else None


def mask_box(mask: np.ndarray) -> list[int] | None:
    """Tight [x0, y0, x1, y1] box (end exclusive) of a 2D mask, None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
