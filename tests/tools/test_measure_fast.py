"""measure's fast paths are exact: hull-based diameters, crops and pruning against brute force.

The references below look at every pixel-centre pair (diameters), label the whole image
(components) and run the distance transform over the whole image (distances), so they share
none of the shortcuts of :mod:`medgym.tools.measure`.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medgym.tools import TOOLS, run_tool
from medgym.tools import measure as m
from medgym.tools.base import Study, ToolContext

SPACINGS = [(1.0, 1.0), (0.7, 0.7), (0.5, 0.8), (2.0, 0.662)]


def brute_diameters(mask2d: np.ndarray, spacing: tuple[float, float]) -> tuple[float, float, float]:
    """Longest distance over all pixel-centre pairs (first such pair in row-major order), its perpendicular extent."""
    ys, xs = np.nonzero(mask2d)
    if len(ys) == 0:
        return 0.0, 0.0, 0.0
    sy, sx = spacing
    y, x = ys.astype(np.float64), xs.astype(np.float64)
    d2 = ((y[None, :] - y[:, None]) * sy) ** 2 + ((x[None, :] - x[:, None]) * sx) ** 2
    top = d2.max()
    if top == 0.0:
        return 0.0, 0.0, 0.0
    pairs = [(i, j) for i, j in np.argwhere(d2 == top) if i < j]  # argwhere walks row-major: first = smallest (i, j)
    i, j = pairs[0]
    longest = float(np.sqrt(top))
    ay, ax = (y[j] - y[i]) * sy / longest, (x[j] - x[i]) * sx / longest
    proj = y * sy * -ax + x * sx * ay
    return longest, float(proj.max() - proj.min()), float(np.degrees(np.arctan2(ay, ax)) % 180.0)


def brute_longest_axial(mask3d: np.ndarray, spacing2d: tuple[float, float]) -> tuple[int, tuple[float, float, float]]:
    """Every slice in order; the first with the longest diameter wins."""
    best_z, best = 0, (-1.0, 0.0, 0.0)
    for z in range(mask3d.shape[0]):
        if mask3d[z].any():
            found = brute_diameters(mask3d[z], spacing2d)
            if found[0] > best[0]:
                best_z, best = z, found
    return best_z, best


def brute_components(mask: np.ndarray) -> list[np.ndarray]:
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    sizes = [int((labels == i).sum()) for i in range(1, n + 1)]
    return [labels == i + 1 for i in sorted(range(n), key=lambda i: (-sizes[i], i))]


def disc(shape: tuple[int, int], cy: float, cx: float, r: float, r_in: float = -1.0) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    return (d2 <= r * r) & (d2 > r_in * r_in)


def ellipse(shape: tuple[int, int], a: float, b: float, angle_deg: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    yy, xx = yy - (shape[0] - 1) / 2, xx - (shape[1] - 1) / 2
    t = np.radians(angle_deg)
    u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def shapes_2d() -> list[tuple[str, np.ndarray]]:
    """Named masks: degenerate ones (pixel, lines), symmetric ones (many equally long pairs), random ones."""
    out: list[tuple[str, np.ndarray]] = []
    single = np.zeros((9, 11), bool)
    single[4, 7] = True
    out.append(("single pixel", single))
    pair = np.zeros((9, 11), bool)
    pair[2, 3] = pair[6, 9] = True
    out.append(("two pixels", pair))
    for n in (2, 5, 60):
        h = np.zeros((n + 4, n + 4), bool)
        h[2, 2 : n + 2] = True
        out += [("row", h), ("column", h.T.copy())]
        d = np.zeros((n + 4, n + 4), bool)
        d[np.arange(n) + 2, np.arange(n) + 2] = True
        out += [("diagonal", d), ("anti-diagonal", d[:, ::-1].copy())]
    steep = np.zeros((70, 40), bool)
    steep[np.arange(0, 66), np.arange(0, 66) // 2] = True  # collinear in steps: no two pixels per row line up
    out.append(("knight line", steep))
    out.append(("square", np.pad(np.ones((7, 7), bool), 3)))
    out.append(("rectangle", np.pad(np.ones((4, 13), bool), 2)))
    out += [("disc", disc((41, 41), 20, 20, r)) for r in (1.5, 3, 8.5, 19)]
    out += [("ring", disc((45, 45), 22, 22, r, r - 2)) for r in (5, 12, 21)]
    out += [("ellipse", ellipse((60, 60), 25, 8, a)) for a in (0, 30, 45, 90, 135, 170)]
    far = np.zeros((30, 50), bool)
    far[2:5, 3:6] = far[24:28, 40:47] = True
    out.append(("two blobs", far))
    rng = np.random.default_rng(0)
    for k in range(60):
        shape = (int(rng.integers(1, 36)), int(rng.integers(1, 36)))
        blob = rng.random(shape) < rng.uniform(0.02, 0.95)
        if k % 3 == 0:  # smooth blobs: long convex outlines, the Qhull path
            blob = ndimage.gaussian_filter(rng.random(shape), 3) > 0.5
        out.append((f"random {k}", blob))
    return [(name, mask) for name, mask in out if mask.any()]


@pytest.mark.parametrize("spacing", SPACINGS)
def test_diameters_match_brute_force_over_all_pixel_pairs(spacing):
    for name, mask in shapes_2d():
        got, want = m.diameters_2d(mask, spacing), brute_diameters(mask, spacing)
        assert got == pytest.approx(want, abs=1e-9), (name, mask.shape, got, want)


def test_diameters_of_degenerate_masks():
    assert m.diameters_2d(np.zeros((5, 5), bool), (1.0, 1.0)) == (0.0, 0.0, 0.0)
    one = np.zeros((5, 5), bool)
    one[2, 3] = True
    assert m.diameters_2d(one, (1.0, 1.0)) == (0.0, 0.0, 0.0)
    line = np.zeros((80, 80), bool)
    line[np.arange(70), np.arange(70)] = True  # more collinear candidates than SMALL_HULL: Qhull refuses them
    longest, short, angle = m.diameters_2d(line, (1.0, 1.0))
    assert longest == pytest.approx(69 * np.sqrt(2)) and short == pytest.approx(0.0, abs=1e-9)
    assert angle == pytest.approx(45.0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.7, 0.7), (5.0, 0.5, 0.8)])
def test_volumes_take_the_first_slice_with_the_longest_diameter(spacing):
    rng = np.random.default_rng(1)
    masks = []
    for _ in range(40):
        shape = (int(rng.integers(1, 7)), int(rng.integers(1, 28)), int(rng.integers(1, 28)))
        masks.append(rng.random(shape) < rng.uniform(0.03, 0.6))
    tied = np.zeros((6, 20, 20), bool)
    tied[1, 2:9, 2:9] = tied[4, 10:17, 10:17] = tied[5, 3:10, 5:12] = True  # three equally long slices
    lesion = np.stack([disc((40, 40), 20, 20, r) for r in (0, 4, 9, 12, 12, 7, 2)])
    masks += [tied, lesion, np.pad(lesion, ((3, 2), (5, 1), (0, 9)))]
    for mask in masks:
        if not mask.any():
            continue
        image = rng.normal(size=mask.shape).astype(np.float32)
        got = m.mask_metrics(mask, spacing, image)
        z, (longest, short, angle) = brute_longest_axial(mask, spacing[1:])
        assert got["slice_index"] == z
        assert [got["longest_diameter_mm"], got["short_axis_mm"], got["long_axis_angle_deg"]] == pytest.approx(
            [round(longest, 3), round(short, 3), round(angle, 3)], abs=1e-3
        )
        assert got["area_mm2"] == pytest.approx(mask[z].sum() * spacing[1] * spacing[2], abs=1e-3)
        assert got["volume_ml"] == pytest.approx(round(mask.sum() * np.prod(spacing) / 1000.0, 3))
        assert got["mean_intensity"] == round(float(image[mask].mean()), 3)
        assert got["max_intensity"] == round(float(image[mask].max()), 3)
        assert got["components"] == len(brute_components(mask))


def test_components_match_labelling_the_whole_image():
    rng = np.random.default_rng(2)
    for k in range(40):
        shape = (64, 64) if k % 2 else (5, 30, 30)
        mask = np.zeros(shape, bool)
        inner = tuple(slice(int(rng.integers(0, n // 2)), int(rng.integers(n // 2, n))) for n in shape)
        mask[inner] = rng.random(mask[inner].shape) < 0.15
        got, want = m.components(mask), brute_components(mask)
        assert len(got) == len(want)
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert m.components(np.zeros((8, 8), bool)) == []


def test_distance_matches_the_whole_image_distance_transform():
    rng = np.random.default_rng(3)
    for spacing in [(1.0, 1.0), (0.7, 1.3)]:
        for _ in range(10):
            a = np.zeros((60, 70), bool)
            b = np.zeros_like(a)
            y, x = rng.integers(0, 50, 2)
            a[y : y + 6, x : x + 4] = True
            y, x = rng.integers(0, 50, 2)
            b[y : y + 3, x : x + 9] = True
            b &= ~a
            if not b.any():
                continue
            edt = ndimage.distance_transform_edt(~a, sampling=spacing)
            ca = np.array(ndimage.center_of_mass(a)) * spacing
            cb = np.array(ndimage.center_of_mass(b)) * spacing
            got = m.distance_mm(a, b, spacing)
            assert got["edge_distance_mm"] == round(float(edt[b].min()), 3)
            assert got["centroid_distance_mm"] == pytest.approx(round(float(np.linalg.norm(ca - cb)), 3), abs=1e-3)


def test_measure_tool_per_component_matches_each_component_measured_alone():
    mask = np.zeros((4, 50, 60), bool)
    mask[1, 10:20, 30:41] = True
    mask[2:4, 35:38, 5:9] = True
    mask[3, 44:47, 50:58] = True
    image = np.random.default_rng(4).normal(size=mask.shape).astype(np.float32)
    study = Study(image=image, spacing=(2.0, 0.8, 0.8), structures={"spots": mask})
    ctx = ToolContext(study=study, tool_mode="oracle")
    r = run_tool(TOOLS, "measure", {"target": "spots"}, ctx)
    assert not r.error, r.text
    per = r.data["per_component"]
    for entry, comp in zip(per, brute_components(mask), strict=True):
        want = m.mask_metrics(comp, study.spacing, image)
        assert {k: entry[k] for k in want} == want
        zs, ys, xs = np.nonzero(comp)
        assert entry["box"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    one = run_tool(TOOLS, "measure", {"target": "spots", "component": 2, "to": "spots"}, ctx)
    assert one.data["slice_index"] == per[1]["slice_index"] == 2
    assert one.data["edge_distance_mm"] == 0.0
