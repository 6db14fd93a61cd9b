"""Prior / current pairs for the follow-up templates (lesion_grown, percent_change, response_category).

Real time points are used when a dataset has them (files named ``<case>_t0``, ``<case>_t1``
... or ``_tp0`` / ``_time0``). Otherwise :func:`synthetic_followup` makes a second time
point from one study: the largest lesion is scaled by a known factor about its centroid
(``scipy.ndimage.affine_transform``, the same factor on every axis), the tissue it
leaves is filled with the median of a ring around it, and the result says so in
``Study.meta["synthetic_followup"]`` - it is not a real second examination.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, TypeVar

import numpy as np
from scipy import ndimage

from medgym.environments.templates import lesion_union, lesions
from medgym.tools.base import Study
from medgym.tools.measure import components

FOLLOW_UP_TEMPLATES = ("lesion_grown", "percent_change", "response_category")
TIME_POINT = re.compile(r"^(?P<case>.+?)_(?:t|tp|time)(?P<k>\d+)$", re.IGNORECASE)

T = TypeVar("T")


def time_point_pairs(names: dict[str, T]) -> dict[str, str]:
    """``{current name: prior name}`` for consecutive time points of one case.

    >>> time_point_pairs({"a_t0": 1, "a_t1": 2, "a_t2": 3, "b": 4})
    {'a_t1': 'a_t0', 'a_t2': 'a_t1'}
    """
    groups: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name in names:
        m = TIME_POINT.match(name)
        if m:
            groups[m.group("case")].append((int(m.group("k")), name))
    pairs: dict[str, str] = {}
    for points in groups.values():
        points.sort()
        for (_, before), (_, after) in zip(points, points[1:], strict=False):
            pairs[after] = before
    return pairs


def draw_scale(rng: np.random.Generator) -> float:
    """A size factor spread over the response categories: gone, shrunk, stable, grown."""
    return float(rng.choice([0.0, rng.uniform(0.4, 0.62), rng.uniform(0.85, 1.12), rng.uniform(1.35, 1.7)]))


def _crop(target: np.ndarray, factor: float) -> tuple[slice, ...]:
    """A box around the lesion big enough to hold it scaled by ``factor``."""
    idx = np.argwhere(target)
    lo, hi = idx.min(0), idx.max(0) + 1
    centre, half = (lo + hi) / 2.0, (hi - lo) / 2.0 * max(factor, 1.0) + 4
    return tuple(
        slice(max(0, int(np.floor(c - h))), min(n, int(np.ceil(c + h)) + 1))
        for c, h, n in zip(centre, half, target.shape, strict=True)
    )


def synthetic_followup(study: Study, factor: float) -> Study:
    """A copy of ``study`` with its largest lesion scaled by ``factor`` (0 removes it) about its centroid."""
    if factor < 0:
        raise ValueError(f"scale factor must be >= 0, got {factor}")
    found = lesions(study)
    if not found:
        raise ValueError("synthetic follow-up needs a lesion to scale; this study has none")
    target = found[0]
    box = _crop(target, factor)
    sub_target = target[box]
    image = study.image.copy()
    sub_image = image[box]
    union = lesion_union(study)
    ring = ndimage.binary_dilation(target, iterations=3) & ~union
    fill = float(np.median(study.image[ring])) if ring.any() else float(np.median(study.image[~union]))
    new = np.zeros(target.shape, dtype=bool)
    if factor > 0:
        centre = np.array(ndimage.center_of_mass(sub_target))
        matrix = np.full(target.ndim, 1.0 / factor)
        offset = centre - centre / factor  # output voxel o samples input (o - c) / f + c
        moved_mask = ndimage.affine_transform(sub_target.astype(np.float32), matrix, offset=offset, order=1) >= 0.5
        moved_image = ndimage.affine_transform(study.image[box].astype(np.float32), matrix, offset=offset, order=1)
        new[box] = moved_mask
        sub_image[sub_target & ~moved_mask] = fill
        sub_image[moved_mask] = moved_image[moved_mask]
    else:
        sub_image[sub_target] = fill
    structures: dict[str, np.ndarray] = {}
    for name, mask in study.structures.items():
        if re.fullmatch(r"lesion(_\d+)?", name):
            continue
        if name.startswith("lesion"):
            structures[name] = (mask & ~target) | new if (mask & target).any() else mask
        elif (mask & target).any():
            structures[name] = mask | new  # the organ keeps the tissue the lesion left
        else:
            structures[name] = mask
    new_union = (union & ~target) | new
    structures["lesion"] = new_union
    for k, comp in enumerate(components(new_union), start=1):
        structures[f"lesion_{k}"] = comp
    meta: dict[str, Any] = dict(study.meta)
    meta["synthetic_followup"] = {
        "synthetic": True,
        "scale": round(factor, 4),
        "about": "centroid of the largest lesion",
        "method": "scipy.ndimage.affine_transform, linear, same factor on every axis; vacated tissue filled "
        "with the median of a 3-voxel ring",
        "note": "not a real second examination",
    }
    z = study.display_slice
    if study.is_3d and new_union.any():
        z = int(np.argmax(new_union.sum(axis=(1, 2))))
    return Study(
        image=image,
        spacing=study.spacing,
        modality=study.modality,
        structures=structures,
        display_slice=z,
        meta=meta,
    )


__all__ = ["FOLLOW_UP_TEMPLATES", "draw_scale", "synthetic_followup", "time_point_pairs"]
