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

from typing import Any

import numpy as np
from pydantic import Field
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from medgym.tools.base import (
    StudyField,
    StudyName,
    ToolArgs,
    ToolContext,
    ToolInputError,
    ToolResult,
    ToolSpec,
    mask_box,
)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """Connected components (8/26-connected), largest first, ties broken by position."""
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    labels, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return []
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    order = sorted(range(n), key=lambda i: (-sizes[i], i))
    return [labels == (i + 1) for i in order]


def diameters_2d(mask2d: np.ndarray, spacing2d: tuple[float, float]) -> tuple[float, float, float]:
    """(longest diameter mm, perpendicular short axis mm, long-axis angle in degrees) of a 2D mask.

    The angle is measured from the image's x axis (columns) towards y (rows), in [0, 180).
    """
    ys, xs = np.nonzero(mask2d)
    if len(xs) == 0:
        return 0.0, 0.0, 0.0
    pts = np.stack([ys * spacing2d[0], xs * spacing2d[1]], axis=1).astype(np.float64)
    if len(pts) >= 3:
        try:
            pts = pts[ConvexHull(pts).vertices]
        except QhullError:  # collinear pixels: every point is on the hull
            pass
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
    i, j = np.unravel_index(np.argmax(d), d.shape)
    longest = float(d[i, j])
    if longest == 0.0:
        return 0.0, 0.0, 0.0
    axis = (pts[j] - pts[i]) / longest
    perp = np.array([-axis[1], axis[0]])
    proj = pts @ perp
    angle = float(np.degrees(np.arctan2(axis[0], axis[1])) % 180.0)
    return longest, float(proj.max() - proj.min()), angle


def mask_metrics(mask: np.ndarray, spacing: tuple[float, ...], image: np.ndarray | None = None) -> dict[str, Any]:
    """All measurements of a (2D or 3D) mask. Raises ToolInputError when it is empty."""
    mask = mask.astype(bool)
    n = int(mask.sum())
    if n == 0:
        raise ToolInputError("the mask is empty: segment the structure first or pick another target.")
    out: dict[str, Any] = {}
    if mask.ndim == 3:
        out["volume_ml"] = n * float(np.prod(spacing)) / 1000.0
        areas = mask.sum(axis=(1, 2))
        best_z, best = 0, (-1.0, 0.0, 0.0)
        for z in np.nonzero(areas)[0]:
            found = diameters_2d(mask[z], spacing[1:])
            if found[0] > best[0]:
                best_z, best = int(z), found
        out.update(
            longest_diameter_mm=best[0],
            short_axis_mm=best[1],
            long_axis_angle_deg=best[2],
            slice_index=best_z,
            area_mm2=float(areas[best_z]) * spacing[1] * spacing[2],
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
    out["components"] = len(components(mask))
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


def distance_mm(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    """Edge-to-edge (closest pixels) and centroid-to-centroid distance in mm."""
    if not a.any() or not b.any():
        raise ToolInputError("cannot measure a distance to an empty mask.")
    edt = ndimage.distance_transform_edt(~a.astype(bool), sampling=spacing)
    edge = float(edt[b.astype(bool)].min())
    ca = np.array(ndimage.center_of_mass(a)) * np.array(spacing)
    cb = np.array(ndimage.center_of_mass(b)) * np.array(spacing)
    return {"edge_distance_mm": round(edge, 3), "centroid_distance_mm": round(float(np.linalg.norm(ca - cb)), 3)}


class MeasureArgs(ToolArgs):
    target: str = Field(
        description="A mask id returned by segment (e.g. 'mask_1') or a named structure of the case "
        "(e.g. 'liver', 'lesion')."
    )
    component: int | None = Field(
        default=None,
        ge=1,
        description="Measure only this connected component (1 = largest); omit to measure the whole "
        "mask and list every component.",
    )
    to: str | None = Field(default=None, description="A second mask id or structure: also report the distance to it.")
    study: StudyName = StudyField


def resolve_mask(ctx: ToolContext, name: str, study_name: str) -> np.ndarray:
    """A mask by id (made by segment this episode) or by structure name."""
    if name in ctx.masks:
        return ctx.masks[name]
    study = ctx.get_study(study_name)
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


def measure(args: MeasureArgs, ctx: ToolContext) -> ToolResult:
    study = ctx.get_study(args.study)
    mask = resolve_mask(ctx, args.target, args.study)
    if mask.shape != study.image.shape:
        raise ToolInputError(f"{args.target!r} was made on another study; pass the matching study.")
    unit = "HU" if study.modality.upper() == "CT" else "(raw units)"
    comps = components(mask)
    if args.component is not None:
        if args.component > len(comps):
            raise ToolInputError(
                f"{args.target!r} has {len(comps)} component(s); component {args.component} does not exist."
            )
        mask = comps[args.component - 1]
        comps = [mask]
    metrics = mask_metrics(mask, study.spacing, study.image)
    label = args.target + (f" component {args.component}" if args.component else "")
    lines = [f"{label}: {_fmt(metrics, unit)}; {metrics['components']} component(s)."]
    data: dict[str, Any] = {"target": args.target, **metrics}
    if len(comps) > 1:
        per = []
        for i, comp in enumerate(comps, start=1):
            m = mask_metrics(comp, study.spacing, study.image)
            box = mask_box(comp if comp.ndim == 2 else comp.any(axis=0))
            per.append({"component": i, "box": box, **m})
            lines.append(f"  component {i} (box {box}): {_fmt(m, unit)}.")
        data["per_component"] = per
    if args.to is not None:
        other = resolve_mask(ctx, args.to, args.study)
        dist = distance_mm(mask, other, study.spacing)
        data.update(dist)
        lines.append(
            f"Distance {label} to {args.to}: edge to edge {dist['edge_distance_mm']:.1f} mm, "
            f"centroid to centroid {dist['centroid_distance_mm']:.1f} mm."
        )
    return ToolResult(text="\n".join(lines), data=data)


SPEC = ToolSpec(
    name="measure",
    description="Measure a segmented mask or named structure in physical units: longest diameter and "
    "short axis (mm), long-axis angle (degrees from the x axis), area (mm2), volume (mL, 3D), mean/max "
    "intensity (HU on CT), number of components, and the distance to a second target.",
    input_model=MeasureArgs,
    fn=measure,
    version="2",  # 2: reports the long axis's angle
    examples=({"target": "lesion_1"}, {"target": "lesion_1", "to": "body"}),
    bad_examples=({"target": "empty"}, {"target": "no_such_mask"}, {"target": "lesion_1", "component": 9}),
)
