"""measure: sizes, intensities and distances of a mask, in physical units from the spacing.

All lengths are in mm, areas in mm^2, volumes in mL and CT intensities in HU. The
functions here are also what task templates use to compute ground truth, so the
expert and the answer key can never disagree about a convention.

Conventions (see the knowledge base): the longest diameter is the largest distance
between two pixel centres of the lesion in an axial plane; the short axis is the
largest extent perpendicular to it; for volumes the longest *axial* diameter is taken
over all slices.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import numpy as np
from pydantic import Field, model_validator
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from medgym.tools.base import (
    ERR_PREDICTED_NAME,
    BoxField,
    SliceField,
    Study,
    StudyField,
    StudyName,
    ToolArgs,
    ToolContext,
    ToolInputError,
    ToolResult,
    ToolSpec,
    check_box,
    mask_box,
)


def bounds(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The mask's bounding box as one slice per axis (None when empty).

    Each axis is found inside the box of the axes before it, so a small lesion in a large image
    costs one pass over the image and a few over its rows. Every measurement then works on the
    crop: the image is read once, not once per step.
    """
    out: list[slice] = []
    sub = mask
    for axis in range(mask.ndim):
        hit = np.flatnonzero(sub.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if len(hit) == 0:
            return None
        out.append(slice(int(hit[0]), int(hit[-1]) + 1))
        sub = mask[tuple(out)]
    return tuple(out)


def _labels(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Connected-component labels (8/26-connected) and the labels ordered largest first, ties by label."""
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels, sorted(range(1, n + 1), key=lambda i: (-sizes[i - 1], i))


def components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (8/26-connected), largest first, ties broken by position."""
    mask = np.asarray(mask, dtype=bool)
    box = bounds(mask)
    if box is None:
        return []
    # Labelling the crop numbers the components in the same raster order as the whole image.
    labels, order = _labels(mask[box])
    out = []
    for i in order:
        full = np.zeros(mask.shape, dtype=bool)
        full[box] = labels == i
        out.append(full)
    return out


def _candidates(mask2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels that can be convex-hull vertices, in row-major order: (rows, cols).

    A hull vertex is the first or last pixel of its row *and* of its column (a pixel between two
    others on a line is not a vertex), so this keeps a few pixels of the outline out of many.
    """
    h, w = mask2d.shape
    rows = np.flatnonzero(mask2d.any(axis=1))
    cols = np.flatnonzero(mask2d.any(axis=0))
    row_ends = np.zeros((h, w), dtype=bool)
    row_ends[rows, mask2d[rows].argmax(axis=1)] = True
    row_ends[rows, w - 1 - mask2d[rows, ::-1].argmax(axis=1)] = True
    col_ends = np.zeros((h, w), dtype=bool)
    col_ends[mask2d[:, cols].argmax(axis=0), cols] = True
    col_ends[h - 1 - mask2d[::-1, cols].argmax(axis=0), cols] = True
    return np.nonzero(row_ends & col_ends)


SMALL_HULL = 48  # below this many candidate pixels, all pairs are cheaper than a Qhull call


def diameters_2d(mask2d: np.ndarray, spacing2d: tuple[float, float]) -> tuple[float, float, float]:
    """(longest diameter mm, perpendicular short axis mm, long-axis angle in degrees) of a 2D mask.

    The angle is measured from the image's x axis (columns) towards y (rows), in [0, 180).
    Exact: the longest distance between two pixel centres is between two convex-hull vertices,
    and the perpendicular extent is reached at vertices too. When several pairs are equally
    long, the first pair in row-major order (first pixel, then second) is the long axis, the
    same pair a search over all pixel pairs in that order finds.
    """
    ys, xs = _candidates(np.asarray(mask2d, dtype=bool))
    if len(ys) == 0:
        return 0.0, 0.0, 0.0
    sy, sx = float(spacing2d[0]), float(spacing2d[1])
    y, x = ys.astype(np.float64), xs.astype(np.float64)
    if len(y) > SMALL_HULL:
        try:
            # Sorted vertex indices keep the candidates' row-major order (the tie rule needs it).
            keep = np.sort(ConvexHull(np.stack([y * sy, x * sx], axis=1)).vertices)
            y, x = y[keep], x[keep]
        except QhullError:  # collinear pixels: keep every candidate
            pass
    # Squared lengths from integer pixel offsets: equal offsets give bit-equal lengths, so ties are exact.
    d2 = ((y[None, :] - y[:, None]) * sy) ** 2 + ((x[None, :] - x[:, None]) * sx) ** 2
    d2 = np.triu(d2, k=1)  # pairs (i, j) with i before j; argmax finds the first longest in row-major order
    i, j = np.unravel_index(np.argmax(d2), d2.shape)
    longest = float(np.sqrt(d2[i, j]))
    if longest == 0.0:
        return 0.0, 0.0, 0.0
    ay, ax = (y[j] - y[i]) * sy / longest, (x[j] - x[i]) * sx / longest
    proj = y * sy * -ax + x * sx * ay
    angle = float(np.degrees(np.arctan2(ay, ax)) % 180.0)
    return longest, float(proj.max() - proj.min()), angle


def _longest_axial(mask3d: np.ndarray, spacing2d: tuple[float, float]) -> tuple[int, tuple[float, float, float]]:
    """(slice, diameters) of the first slice with the longest axial diameter.

    Slices are visited longest bounding-box diagonal first; one whose diagonal (an upper bound
    on its diameter) cannot beat the best so far is skipped.
    """
    sy, sx = float(spacing2d[0]), float(spacing2d[1])
    rows, cols = mask3d.any(axis=2), mask3d.any(axis=1)
    zs = np.flatnonzero(rows.any(axis=1))
    h = rows.shape[1] - 1 - rows[zs, ::-1].argmax(axis=1) - rows[zs].argmax(axis=1)
    w = cols.shape[1] - 1 - cols[zs, ::-1].argmax(axis=1) - cols[zs].argmax(axis=1)
    # sqrt is monotone, so no diameter on a slice exceeds its bounding box's diagonal as computed here.
    bound = np.sqrt((h * sy) ** 2 + (w * sx) ** 2)
    best_z, best = -1, (0.0, 0.0, 0.0)
    for k in sorted(range(len(zs)), key=lambda k: (-bound[k], zs[k])):
        z = int(zs[k])
        if best_z >= 0 and (bound[k] < best[0] or (bound[k] == best[0] and z > best_z)):
            continue  # cannot be longer, or only as long on a later slice
        found = diameters_2d(mask3d[z], spacing2d)
        if best_z < 0 or found[0] > best[0] or (found[0] == best[0] and z < best_z):
            best_z, best = z, found
    return best_z, best


def _metrics(mask: np.ndarray, spacing: tuple[float, ...], image: np.ndarray | None, z0: int = 0) -> dict[str, Any]:
    """mask_metrics of a non-empty mask cropped to (at least) its bounding box; ``z0``: the crop's first slice."""
    n = int(np.count_nonzero(mask))
    out: dict[str, Any] = {}
    if mask.ndim == 3:
        out["volume_ml"] = n * float(np.prod(spacing)) / 1000.0
        z, best = _longest_axial(mask, spacing[1:])
        out.update(
            longest_diameter_mm=best[0],
            short_axis_mm=best[1],
            long_axis_angle_deg=best[2],
            slice_index=z0 + z,
            area_mm2=float(np.count_nonzero(mask[z])) * spacing[1] * spacing[2],
        )
    else:
        longest, short, angle = diameters_2d(mask, spacing)
        out.update(
            longest_diameter_mm=longest,
            short_axis_mm=short,
            long_axis_angle_deg=angle,
            area_mm2=n * spacing[0] * spacing[1],
        )
    if image is not None:
        values = image[mask]
        out.update(mean_intensity=float(values.mean()), max_intensity=float(values.max()))
    out["components"] = int(ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))[1])
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


def mask_metrics(mask: np.ndarray, spacing: tuple[float, ...], image: np.ndarray | None = None) -> dict[str, Any]:
    """All measurements of a (2D or 3D) mask. Raises ToolInputError when it is empty."""
    mask = np.asarray(mask, dtype=bool)
    box = bounds(mask)
    if box is None:
        raise ToolInputError("the mask is empty: segment the structure first or pick another target.")
    return _metrics(mask[box], spacing, None if image is None else image[box], z0=box[0].start if mask.ndim == 3 else 0)


def distance_mm(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    """Edge-to-edge (closest pixels) and centroid-to-centroid distance in mm."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    box_a, box_b = bounds(a), bounds(b)
    if box_a is None or box_b is None:
        raise ToolInputError("cannot measure a distance to an empty mask.")
    # Both masks lie in the box around both, and straight-line distances do not leave it: crop to it.
    box = tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(box_a, box_b, strict=True))
    offset = np.array([s.start for s in box], dtype=np.float64)
    a, b = a[box], b[box]
    edt = ndimage.distance_transform_edt(~a, sampling=spacing)
    edge = float(edt[b].min())
    ca = (np.array(ndimage.center_of_mass(a)) + offset) * np.array(spacing)
    cb = (np.array(ndimage.center_of_mass(b)) + offset) * np.array(spacing)
    return {"edge_distance_mm": round(edge, 3), "centroid_distance_mm": round(float(np.linalg.norm(ca - cb)), 3)}


class MeasureArgs(ToolArgs):
    target: str | None = Field(
        default=None,
        description="A mask id returned by segment earlier in this episode (e.g. 'mask_1'); in oracle mode also "
        "a ground-truth structure named in the question. Give target or box.",
    )
    box: Annotated[list[float], BoxField] | None = Field(
        default=None,
        description="Measure this rectangle [x0, y0, x1, y1] (pixels, on the shown slice) as a region instead of a "
        "mask: its mean and max intensity, area and size.",
    )
    component: int | None = Field(
        default=None,
        ge=1,
        description="Measure only this connected component (1 = largest); omit to measure the whole "
        "mask and list every component.",
    )
    to: str | None = Field(
        default=None, description="A second mask id (or, in oracle mode, a structure): also report the distance to it."
    )
    slice_index: int | None = SliceField
    study: StudyName = StudyField

    @model_validator(mode="after")
    def _one_region(self) -> MeasureArgs:
        if (self.target is None) == (self.box is None):
            raise ValueError("give exactly one of target (a mask id such as 'mask_1') or box (a region)")
        if self.box is not None and self.to is not None:
            raise ValueError("'to' needs a mask target: segment the region first, then measure mask_N with to")
        return self


def box_region(study: Study, box: list[float], slice_index: int | None) -> np.ndarray:
    """The pixels a box covers (whole pixels it touches), on one slice of a volume."""
    h, w = study.shape2d
    x0, y0, x1, y1 = check_box(box, (h, w))
    region = np.zeros(study.shape2d, dtype=bool)
    region[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
    if not study.is_3d:
        return region
    out = np.zeros(study.image.shape, dtype=bool)
    out[study.resolve_slice(slice_index)] = region
    return out


def resolve_mask(ctx: ToolContext, name: str, study_name: str) -> np.ndarray:
    """A mask by id (made by segment this episode), or by structure name in oracle mode only."""
    if name in ctx.masks:
        return ctx.masks[name]
    study = ctx.get_study(study_name)
    if not ctx.oracle:
        if ctx.masks:
            raise ToolInputError(
                ERR_PREDICTED_NAME.format(name=name) + f" Masks made so far: {', '.join(sorted(ctx.masks))}."
            )
        raise ToolInputError(ERR_PREDICTED_NAME.format(name=name))
    if name in study.structures:
        return study.structures[name]
    known = sorted(ctx.masks) + sorted(study.structures)
    raise ToolInputError(f"unknown target {name!r}; known masks and structures: {', '.join(known)}.")


def _fmt(m: dict[str, Any], unit: str) -> str:
    parts = [
        f"longest diameter {m['longest_diameter_mm']:.1f} mm at {m['long_axis_angle_deg']:.0f} deg",
        f"short axis {m['short_axis_mm']:.1f} mm",
    ]
    if "volume_ml" in m:
        parts.append(f"volume {m['volume_ml']:.2f} mL (longest diameter on slice {m['slice_index']})")
    parts.append(f"area {m['area_mm2']:.1f} mm2")
    if "mean_intensity" in m:
        parts.append(f"mean {m['mean_intensity']:.1f} {unit}, max {m['max_intensity']:.1f} {unit}")
    return ", ".join(parts)


def _box_of(mask: np.ndarray, offset: tuple[int, ...]) -> list[int] | None:
    """mask_box of a cropped mask, in the coordinates of the image the crop starts at ``offset`` in."""
    box = mask_box(mask if mask.ndim == 2 else mask.any(axis=0))
    if box is None:
        return None
    y0, x0 = offset[-2:]
    return [box[0] + x0, box[1] + y0, box[2] + x0, box[3] + y0]


def measure(args: MeasureArgs, ctx: ToolContext) -> ToolResult:
    study = ctx.get_study(args.study)
    if args.box is not None:
        target = "box " + json.dumps([round(float(v), 1) for v in args.box])
        mask = box_region(study, args.box, args.slice_index)
    else:
        target = str(args.target)
        mask = resolve_mask(ctx, target, args.study)
    if mask.shape != study.image.shape:
        raise ToolInputError(f"{target!r} was made on another study; pass the matching study.")
    unit = "HU" if study.modality.upper() == "CT" else "(raw units)"
    mask = np.asarray(mask, dtype=bool)
    # Everything below works on the crop to the mask's box: one pass over the whole image.
    box = bounds(mask)
    if box is None:
        comps: list[np.ndarray] = []
        box = tuple(slice(0, n) for n in mask.shape)
    else:
        labels, order = _labels(mask[box])
        comps = [labels == i for i in order]
    offset = tuple(s.start for s in box)
    image = study.image[box]
    crop = mask[box]
    if args.component is not None:
        if args.component > len(comps):
            raise ToolInputError(
                f"{target!r} has {len(comps)} component(s); component {args.component} does not exist."
            )
        crop = comps[args.component - 1]
        comps = [crop]
    if not crop.any():
        raise ToolInputError("the mask is empty: segment the structure first or pick another target.")
    z0 = offset[0] if crop.ndim == 3 else 0
    metrics = _metrics(crop, study.spacing, image, z0)
    label = target + (f" component {args.component}" if args.component else "")
    lines = [f"{label}: {_fmt(metrics, unit)}; {metrics['components']} component(s)."]
    data: dict[str, Any] = {"target": target, **metrics}
    if len(comps) > 1:
        per = []
        for i, comp in enumerate(comps, start=1):
            m = _metrics(comp, study.spacing, image, z0)
            comp_box = _box_of(comp, offset)
            per.append({"component": i, "box": comp_box, **m})
            lines.append(f"  component {i} (box {comp_box}): {_fmt(m, unit)}.")
        data["per_component"] = per
    if args.to is not None:
        other = resolve_mask(ctx, args.to, args.study)
        measured = np.zeros(mask.shape, dtype=bool)
        measured[box] = crop
        dist = distance_mm(measured, other, study.spacing)
        data.update(dist)
        lines.append(
            f"Distance {label} to {args.to}: edge to edge {dist['edge_distance_mm']:.1f} mm, "
            f"centroid to centroid {dist['centroid_distance_mm']:.1f} mm."
        )
    return ToolResult(text="\n".join(lines), data=data)


SPEC = ToolSpec(
    name="measure",
    description="Measure a mask made by segment (or a box region) in physical units: longest diameter and "
    "short axis (mm), long-axis angle (degrees from the x axis), area (mm2), volume (mL, 3D), mean/max "
    "intensity (HU on CT), number of components, and the distance to a second target.",
    input_model=MeasureArgs,
    fn=measure,
    version="3",  # 2: reports the long axis's angle; 3: equally long diameters: the first pair in row-major order
    examples=({"target": "lesion_1"}, {"target": "lesion_1", "to": "body"}, {"box": [60, 60, 140, 140]}),
    bad_examples=({"target": "empty"}, {"target": "no_such_mask"}, {"target": "lesion_1", "component": 9}),
)
