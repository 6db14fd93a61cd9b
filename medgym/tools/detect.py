"""detect: list candidate findings that stand out from their surroundings, found from the pixels alone.

An automatic, classical detector (no ground truth, no learned weights), so it runs in predicted
mode: each plane is smoothed, a local background (a median over a window a sixth of the image
wide, taken on a 4x-reduced copy for speed) is subtracted, and connected regions brighter or
darker than it by ``THRESHOLD`` robust noise units (median absolute deviation of the residual)
become candidates, each boxed with a ``MARGIN`` of pixels. On a volume the planes are stacked and regions are joined in 3D; each
candidate is reported on the middle slice of its extent (where a blob is widest; the
thresholded area shrinks toward a large blob's centre, so its largest slice can be off). Regions that cannot be a focal finding are dropped:
under ``MIN_AREA_PX`` pixels, a bounding box over ``MAX_BOX_FRACTION`` of the image, less than
``MIN_FILL`` of the bounding box filled (outlines, rims), and on CT bone (mean above
``BONE_HU``). Candidates are ranked by contrast: the difference between the region's mean and
the median of a thin ring around it, over the ring's spread. Not every candidate is a finding.
The listed candidates are kept in the context, so ``segment`` can take one by its number
(``{"candidate": 1}``) as a prompt: its box, on its slice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field
from scipy import ndimage

from medgym.tools.base import StudyField, StudyName, ToolArgs, ToolContext, ToolResult, ToolSpec
from medgym.tools.imaging import draw_overlay, to_display

THRESHOLD = 4.0
MIN_AREA_PX = 8
MAX_BOX_FRACTION = 0.08
MIN_FILL = 0.35
BONE_HU = 300.0
REDUCE = 4
WINDOW_FRACTION = 6  # the local background is a median over 1/WINDOW_FRACTION of the image
MARGIN = 2  # pixels added to each side of a candidate's box, so it prompts segment with room


class DetectArgs(ToolArgs):
    max_candidates: int = Field(default=5, ge=1, le=10, description="How many candidates to list, best first.")
    slice_index: int | None = Field(
        default=None,
        description="On a volume: search this axial slice only; omit to search the whole volume "
        "(each candidate is reported on the middle slice of its extent).",
    )
    study: StudyName = StudyField


def _residual(smooth: np.ndarray) -> np.ndarray:
    """A smoothed plane minus its local background (a median over a sixth of the image)."""
    small = smooth[::REDUCE, ::REDUCE]
    size = max(3, min(small.shape) // WINDOW_FRACTION)
    background = ndimage.median_filter(small, size=size, mode="nearest")
    background = np.repeat(np.repeat(background, REDUCE, axis=0), REDUCE, axis=1)[: smooth.shape[0], : smooth.shape[1]]
    return smooth - background


def _noise(residual: np.ndarray) -> float:
    return float(np.median(np.abs(residual - np.median(residual))) * 1.4826) + 1e-6


def _middle_slice(comp: np.ndarray) -> int:
    """The slice a 3D region is reported on: the middle of its extent (a blob's widest), if the region is there."""
    middle = comp.shape[0] // 2
    return middle if comp[middle].any() else int(np.argmax(comp.sum(axis=(1, 2))))


def candidates(image: np.ndarray, modality: str = "CT") -> list[dict[str, Any]]:
    """Candidate regions of a 2D plane or 3D volume, ranked by contrast (see the module text)."""
    volume = image[None] if image.ndim == 2 else image
    smooth = np.stack([ndimage.gaussian_filter(p.astype(np.float64), 1.0) for p in volume])
    residual = np.stack([_residual(p) for p in smooth])
    noise = _noise(residual)
    h, w = volume.shape[1:]
    found: list[dict[str, Any]] = []
    plane_structure = np.zeros((3, 3, 3), dtype=bool)
    plane_structure[1] = ndimage.generate_binary_structure(2, 1)
    for sign in (1.0, -1.0):
        marked = sign * residual / noise > THRESHOLD
        marked = ndimage.binary_opening(marked, structure=plane_structure)
        marked = np.stack([ndimage.binary_fill_holes(p) for p in marked])
        labels, _ = ndimage.label(marked)
        for i, where in enumerate(ndimage.find_objects(labels), start=1):
            if where is None:
                continue
            comp = labels[where] == i
            z_local = _middle_slice(comp)
            z = where[0].start + z_local
            flat = comp[z_local]
            area = int(flat.sum())
            ys, xs = np.nonzero(flat)
            y0, y1 = where[1].start + int(ys.min()), where[1].start + int(ys.max()) + 1
            x0, x1 = where[2].start + int(xs.min()), where[2].start + int(xs.max()) + 1
            box_area = (y1 - y0) * (x1 - x0)
            if area < MIN_AREA_PX or box_area > MAX_BOX_FRACTION * h * w or area < MIN_FILL * box_area:
                continue
            mask = np.zeros((h, w), dtype=bool)
            mask[y0:y1, x0:x1] = flat[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            mean = float(volume[z][mask].mean())
            if modality.upper() == "CT" and mean > BONE_HU:
                continue
            ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask, iterations=1)
            around = smooth[z][ring]
            spread = float(around.std()) + 0.5 * noise
            contrast = abs(float(smooth[z][mask].mean()) - float(np.median(around))) / spread
            found.append(
                {
                    "box": [max(0, x0 - MARGIN), max(0, y0 - MARGIN), min(w, x1 + MARGIN), min(h, y1 + MARGIN)],
                    "slice_index": z if image.ndim == 3 else None,
                    "area_px": area,
                    "mean_intensity": round(mean, 1),
                    "contrast": round(contrast, 1),
                    "brighter": sign > 0,
                }
            )
    found.sort(key=lambda c: -c["contrast"])
    return found


def detect(args: DetectArgs, ctx: ToolContext) -> ToolResult:
    study = ctx.get_study(args.study)
    z = study.resolve_slice(args.slice_index) if args.slice_index is not None else None
    if z is not None:
        found = candidates(study.plane(z), study.modality)
        for c in found:
            c["slice_index"] = z
    else:
        found = candidates(study.image, study.modality)
    listed = found[: args.max_candidates]
    ctx.candidates[args.study] = listed  # segment {"candidate": k} takes the k-th
    px_mm2 = study.spacing2d[0] * study.spacing2d[1]
    unit = " HU" if study.modality.upper() == "CT" else ""
    lines = []
    for i, c in enumerate(listed, start=1):
        c["area_mm2"] = round(c["area_px"] * px_mm2, 1)
        where = "" if c["slice_index"] is None else f" slice {c['slice_index']}"
        mean = f"{c['mean_intensity']:.0f}" if unit else f"{c['mean_intensity']:.3g}"
        lines.append(
            f"{i}: box {c['box']}{where}, area {c['area_mm2']:.1f} mm2, mean {mean}{unit}, "
            f"{'brighter' if c['brighter'] else 'darker'}, contrast {c['contrast']:.1f}"
        )
    if not listed:
        text = "No candidate stands out from its surroundings."
    else:
        text = (
            f"{len(listed)} candidate(s) of {len(found)}, best first (not all are findings): " + "; ".join(lines) + "."
        )
    if listed and study.is_3d:
        z = listed[0]["slice_index"]
    elif z is None:
        z = study.resolve_slice(None)
    shown = [c["box"] for c in listed if c["slice_index"] == z]
    image = draw_overlay(to_display(study.plane(z), study.modality), [], shown)
    return ToolResult(text=text, images=[image], data={"candidates": listed, "boxes": [c["box"] for c in listed]})


SPEC = ToolSpec(
    name="detect",
    description="List candidate findings that stand out from their surroundings (found automatically from the "
    "pixels, best first; segment one by its number). Not every candidate is a finding.",
    input_model=DetectArgs,
    fn=detect,
    examples=({}, {"max_candidates": 3}),
    bad_examples=({"max_candidates": 0}, {"max_candidates": "all"}),
)
