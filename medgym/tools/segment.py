"""segment: make a mask from a box, a point, a detect candidate or a named structure, and store it.

A candidate prompt (``{"candidate": k}``) is the box, on its slice, of the k-th candidate the last
``detect`` call listed on that study. Box, point and candidate prompts run the segmentation
backend chosen by ``ToolContext.segmenter`` (see :mod:`medgym.tools.segmenters`) on one 2D plane. A named structure is read from
the case's label map, so it is exact, and for 3D studies it is the whole 3D mask.
The mask is kept in ``ctx.masks`` under a new id (``mask_1`` ...) that ``measure``
and other tools accept.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field, model_validator

from medgym.tools.base import (
    ERR_PREDICTED_NAME,
    BoxField,
    SliceField,
    StudyField,
    StudyName,
    ToolArgs,
    ToolContext,
    ToolInputError,
    ToolResult,
    ToolSpec,
    check_box,
    mask_box,
    organ_names,
    organ_of,
)
from medgym.tools.imaging import draw_overlay, to_display
from medgym.tools.measure import components
from medgym.tools.segmenters import segment_plane

OUTSIDE_ORGANS = "outside named organs"


class SegmentArgs(ToolArgs):
    box: Annotated[list[float], BoxField] | None = Field(
        default=None,
        description="Box [x0, y0, x1, y1] in pixels around the one object to segment; make it fit the "
        "object with a small margin.",
    )
    point: list[float] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="A point [x, y] in pixels inside the object to segment (x is the column, y the row).",
    )
    candidate: int | None = Field(
        default=None,
        ge=1,
        le=10,
        description="The number of a candidate listed by the last detect call on this study: its box, on its "
        "slice, is the prompt.",
    )
    structure: str | None = Field(
        default=None,
        description="Oracle mode only (an upper bound): the name of a ground-truth structure listed in the "
        "question, taken exactly. In predicted mode (the default) no automatic segmenter ships, so no names are "
        "offered: prompt with a box or point.",
    )
    slice_index: int | None = SliceField
    propagate: bool = Field(
        default=False,
        description="On a volume, with a box or point prompt: carry the mask to the neighbouring slices "
        "(each prompted with the box of the slice before it) until the object ends, giving a 3D mask "
        "whose volume measure reports.",
    )
    study: StudyName = StudyField

    @model_validator(mode="after")
    def _one_prompt(self) -> SegmentArgs:
        given = [k for k in ("box", "point", "candidate", "structure") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of box, point, candidate or structure (got {', '.join(given) or 'none'}); "
                "call segment once per prompt"
            )
        return self


def _organ_of(comp: np.ndarray, structures: dict[str, np.ndarray]) -> str | None:
    """The organ holding most of a component; None when the case names no organs."""
    if not organ_names(structures):
        return None
    return organ_of(comp, structures) or OUTSIDE_ORGANS


def _largest_slice(mask3d: np.ndarray) -> int:
    return int(np.argmax(mask3d.sum(axis=(1, 2))))


def _area_px(mask: np.ndarray) -> int:
    """Pixels in the plane shown: the whole 2D mask, or the largest slice of a 3D mask."""
    return int(mask.sum() if mask.ndim == 2 else mask.sum(axis=(1, 2)).max())


def _describe(mask: np.ndarray, study: Any, backend: str, organs: bool = True) -> tuple[list[str], dict[str, Any]]:
    """Per-component text and data: 2D box (projection for 3D), organ and area."""
    px_mm2 = study.spacing2d[0] * study.spacing2d[1]
    parts, comps = [], []
    for i, comp in enumerate(components(mask), start=1):
        box = mask_box(comp if comp.ndim == 2 else comp.any(axis=0))
        organ = _organ_of(comp, study.structures) if organs else None
        entry: dict[str, Any] = {"box": box, "organ": organ, "area_mm2": round(_area_px(comp) * px_mm2, 2)}
        if comp.ndim == 3:
            entry["volume_ml"] = round(int(comp.sum()) * float(np.prod(study.spacing)) / 1000.0, 3)
        comps.append(entry)
        where = "" if organ is None else (f" {organ}" if organ == OUTSIDE_ORGANS else f" in {organ}")
        parts.append(f"component {i} box {box}{where}")
    area_px = _area_px(mask)
    data: dict[str, Any] = {
        "box": mask_box(mask if mask.ndim == 2 else mask.any(axis=0)),
        "area_px": area_px,
        "area_mm2": round(area_px * px_mm2, 2),
        "components": comps,
        "backend": backend,
    }
    return parts, data


# Propagation stops where the object ends: the next slice's mask must overlap this one's and not
# outgrow it (a box with no object left in it segments background, which is larger or elsewhere).
PROPAGATE_MIN_OVERLAP = 0.5
PROPAGATE_MAX_GROWTH = 1.25
PROPAGATE_MARGIN = 2


def propagate(ctx: ToolContext, study: Any, mask: np.ndarray, z: int) -> None:
    """Extend a one-slice mask of a volume through the slices above and below, in place."""
    h, w = study.shape2d
    for step in (-1, 1):
        prev, k = mask[z], z + step
        while 0 <= k < mask.shape[0]:
            b = mask_box(prev)
            box = (
                max(0.0, b[0] - PROPAGATE_MARGIN),
                max(0.0, b[1] - PROPAGATE_MARGIN),
                min(float(w), b[2] + PROPAGATE_MARGIN),
                min(float(h), b[3] + PROPAGATE_MARGIN),
            )
            nxt = np.asarray(segment_plane(ctx, study.plane(k), study.modality, box=box), dtype=bool)
            area = int(nxt.sum())
            if (
                area == 0
                or area > PROPAGATE_MAX_GROWTH * prev.sum()
                or (nxt & prev).sum() < PROPAGATE_MIN_OVERLAP * area
            ):
                break
            mask[k] = nxt
            prev, k = nxt, k + step


def _candidate(args: SegmentArgs, ctx: ToolContext) -> tuple[list[float], int | None, str]:
    """The box and slice of a candidate the last detect call listed on the study, and its label."""
    listed = ctx.candidates.get(args.study)
    if not listed:
        raise ToolInputError(f"no candidates listed on the {args.study} study yet: call detect first.")
    if args.candidate > len(listed):
        raise ToolInputError(f"candidate {args.candidate} was not listed: detect listed {len(listed)}.")
    c = listed[args.candidate - 1]
    if c["slice_index"] is not None and args.slice_index not in (None, c["slice_index"]):
        raise ToolInputError(
            f"candidate {args.candidate} is on slice {c['slice_index']}, not {args.slice_index}: omit slice_index."
        )
    box = [float(v) for v in c["box"]]
    return box, c["slice_index"], f"candidate {args.candidate} box {[round(v) for v in box]}"


def segment(args: SegmentArgs, ctx: ToolContext) -> ToolResult:
    study = ctx.get_study(args.study)
    prompt_box: list[float] | None = None
    if args.structure is not None:
        if not ctx.oracle:
            raise ToolInputError(ERR_PREDICTED_NAME.format(name=args.structure))
        if args.structure not in study.structures:
            raise ToolInputError(
                f"unknown structure {args.structure!r}; this case has: {', '.join(sorted(study.structures))}. "
                "Or prompt with a box or point."
            )
        mask = study.structures[args.structure].astype(bool)
        label, backend = repr(args.structure), "structure"
        if not mask.any():
            return ToolResult(
                text=f"No {args.structure!r} was found in this case (the structure is empty); no mask stored.",
                data={
                    "mask_id": None,
                    "box": None,
                    "area_px": 0,
                    "area_mm2": 0.0,
                    "components": [],
                    "backend": backend,
                },
            )
        z = _largest_slice(mask) if mask.ndim == 3 else None
    else:
        box, slice_index, label = args.box, args.slice_index, None
        if args.candidate is not None:
            box, slice_index, label = _candidate(args, ctx)
        z = study.resolve_slice(slice_index)
        plane = study.plane(z)
        h, w = study.shape2d
        if box is not None:
            prompt_box = [float(v) for v in check_box(box, (h, w))]
            mask2d = segment_plane(ctx, plane, study.modality, box=tuple(prompt_box))
            label = label or f"box {[round(v) for v in box]}"
        else:
            x, y = args.point
            if not (0 <= x < w and 0 <= y < h):
                raise ToolInputError(
                    f"point {args.point} lies outside the image (width {w}, height {h}); "
                    f"use x in [0, {w}) and y in [0, {h})."
                )
            mask2d = segment_plane(ctx, plane, study.modality, point=(float(x), float(y)))
            label = f"point {[round(v) for v in args.point]}"
        mask2d = np.asarray(mask2d, dtype=bool)
        if not mask2d.any():
            raise ToolInputError(
                f"nothing was segmented for {label}; draw a somewhat larger box around the whole "
                "object, or check that it is on this slice."
            )
        backend = ctx.segmenter
        if z is None:
            mask = mask2d
        else:
            mask = np.zeros(study.image.shape, dtype=bool)
            mask[z] = mask2d
            if args.propagate:
                propagate(ctx, study, mask, z)

    mask_id = ctx.new_mask_id()
    ctx.masks[mask_id] = mask
    # Organ labels come from ground-truth organ masks: only an oracle may print them.
    parts, data = _describe(mask, study, backend, organs=ctx.oracle)
    where = "" if z is None else f" (slice {z})"
    text = f"{mask_id}: segmented {label}{where} - {len(parts)} component(s), area {data['area_mm2']:.1f} mm2"
    if mask.ndim == 3 and (args.structure is not None or args.propagate):
        volume = int(mask.sum()) * float(np.prod(study.spacing)) / 1000.0
        data["volume_ml"] = round(volume, 3)
        text += f" on its largest slice, volume {volume:.2f} mL"
    text += "; " + "; ".join(parts) + "."
    data = {"mask_id": mask_id, **data, "slice_index": z}

    mask2d = mask if mask.ndim == 2 else mask[z]
    overlay_box = prompt_box if prompt_box is not None else data["box"]
    image = draw_overlay(to_display(study.plane(z), study.modality), [mask2d], [overlay_box])
    return ToolResult(text=text, images=[image], data=data)


SPEC = ToolSpec(
    name="segment",
    description="Segment one object from a prompt and store its mask (returns a mask id such as 'mask_1' for "
    "measure). Prompt with exactly one of: a box around the object, a point inside it, or the number of a "
    "candidate that detect listed (the segmenter reads the pixels), or - in oracle mode only - the name of a ground-truth structure. Reports each connected component's "
    "box and area, and shows the mask overlaid on the image.",
    input_model=SegmentArgs,
    fn=segment,
    examples=({"structure": "lesion_1"}, {"box": [60, 60, 140, 140]}),
    bad_examples=(
        {"box": [900, 900, 1000, 1000]},
        {"structure": "no_such"},
        {"box": [1, 2, 3, 4], "structure": "lesion_1"},
        {"candidate": 1},
    ),
)
