"""The tool contract over every registered tool, and the geometry of zoom, window and measure."""

from __future__ import annotations

import numpy as np
import pytest

from medgym.environments.checks import check_context
from medgym.tools import TOOLS, Study, ToolContext, run_tool
from medgym.tools.base import ERR_INVALID_ARGS, ERR_UNKNOWN_TOOL, ToolArgs, ToolResult, ToolSpec
from medgym.tools.checker import ToolCheckError, check_tool


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_every_tool_honours_the_contract(name):
    assert "bad-input" in check_tool(TOOLS[name], check_context)


def test_check_tool_catches_a_tool_that_raises_on_bad_input():
    class Args(ToolArgs):
        x: int

    def broken(args: Args, ctx: ToolContext) -> ToolResult:
        raise RuntimeError("boom")

    spec = ToolSpec(name="broken", description="d", input_model=Args, fn=broken, examples=({"x": 1},))
    with pytest.raises(ToolCheckError) as err:
        check_tool(spec, check_context)
    assert "field 'x' has no description" in str(err.value)
    assert "raised RuntimeError: boom" in str(err.value)


def test_check_tool_catches_nondeterminism():
    from pydantic import Field

    class Args(ToolArgs):
        x: int = Field(description="x")

    counter = iter(range(1000))

    def drifting(args: Args, ctx: ToolContext) -> ToolResult:
        return ToolResult(text=f"call {next(counter)}")

    spec = ToolSpec(name="drift", description="d", input_model=Args, fn=drifting, examples=({"x": 1},))
    with pytest.raises(ToolCheckError, match="not deterministic"):
        check_tool(spec, check_context)


def test_unknown_tool_and_bad_arguments_are_readable_errors(ctx):
    r = run_tool(TOOLS, "scalpel", {}, ctx)
    assert r.error and r.text == ERR_UNKNOWN_TOOL.format(name="scalpel", names=", ".join(sorted(TOOLS)))
    r = run_tool(TOOLS, "zoom", {"boxes": [[0, 0, 10, float("nan")]]}, ctx)
    assert r.error and r.text.startswith(ERR_INVALID_ARGS.split("{")[0])
    r = run_tool(TOOLS, "measure", {"target": "empty"}, ctx)
    assert r.error and "empty" in r.text


def _disk(n: int, r: float, cy: float, cx: float) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


@pytest.mark.parametrize("radius,spacing", [(10, 1.0), (23, 0.7), (37.5, 0.45)])
def test_measure_disk_diameter_within_one_pixel(radius, spacing):
    mask = _disk(128, radius, 64.0, 63.5)
    study = Study(image=np.full((128, 128), 42.0, np.float32), spacing=(spacing, spacing), structures={"disk": mask})
    r = run_tool(TOOLS, "measure", {"target": "disk"}, ToolContext(study=study, tool_mode="oracle"))
    assert not r.error
    assert abs(r.data["longest_diameter_mm"] - 2 * radius * spacing) <= spacing
    assert abs(r.data["short_axis_mm"] - 2 * radius * spacing) <= 2 * spacing
    assert r.data["area_mm2"] == pytest.approx(np.pi * radius**2 * spacing**2, rel=0.03)
    assert r.data["mean_intensity"] == pytest.approx(42.0)
    assert "mm" in r.text and "HU" in r.text


def test_measure_respects_anisotropic_spacing_volume_and_distance():
    vol = np.zeros((10, 64, 64), bool)
    vol[2:6, 10:20, 10:30] = True  # 4 x 10 x 20 voxels
    other = np.zeros_like(vol)
    other[2:6, 40:50, 10:30] = True
    study = Study(image=np.zeros(vol.shape, np.float32), spacing=(2.5, 0.7, 0.5), structures={"a": vol, "b": other})
    r = run_tool(TOOLS, "measure", {"target": "a", "to": "b"}, ToolContext(study=study, tool_mode="oracle"))
    assert r.data["volume_ml"] == pytest.approx(4 * 10 * 20 * 2.5 * 0.7 * 0.5 / 1000, rel=1e-3)
    assert r.data["longest_diameter_mm"] == pytest.approx(np.hypot(9 * 0.7, 19 * 0.5), abs=1e-3)
    assert r.data["edge_distance_mm"] == pytest.approx((40 - 19) * 0.7, abs=1e-3)
    assert r.data["centroid_distance_mm"] == pytest.approx(30 * 0.7, abs=1e-3)


def test_measure_lists_components_largest_first(ctx):
    two = _disk(256, 12, 60, 60) | _disk(256, 6, 180, 180)
    ctx.study.structures["pair"] = two
    r = run_tool(TOOLS, "measure", {"target": "pair"}, ctx)
    assert r.data["components"] == 2
    sizes = [c["area_mm2"] for c in r.data["per_component"]]
    assert sizes == sorted(sizes, reverse=True)
    one = run_tool(TOOLS, "measure", {"target": "pair", "component": 2}, ctx)
    assert one.data["area_mm2"] == pytest.approx(sizes[1])


def test_zoom_returns_upsampled_crops_with_their_boxes(ctx):
    r = run_tool(TOOLS, "zoom", {"boxes": [[10, 20, 42, 36], [-5, -5, 30, 30]], "size": 128}, ctx)
    assert not r.error
    assert r.data["boxes"] == [[10, 20, 42, 36], [0, 0, 30, 30]]  # clipped to the image
    assert r.images[0].shape == (64, 128, 3) and r.images[1].shape == (128, 128, 3)


def test_window_presets_change_contrast(ctx):
    lung = run_tool(TOOLS, "window", {"preset": "lung"}, ctx).images[0]
    bone = run_tool(TOOLS, "window", {"preset": "bone"}, ctx).images[0]
    body = ctx.study.structures["body"]
    assert lung[body].mean() > bone[body].mean() + 50  # soft tissue is bright in a lung window, dark in bone
    r = run_tool(TOOLS, "window", {"preset": "lung", "center": 3}, ctx)
    assert r.error and "not both" in r.text


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 135.0])
def test_measure_reports_the_long_axis_angle(angle):
    yy, xx = np.mgrid[:200, :200] - 100.0
    t = np.radians(angle)
    u, v = xx * np.cos(t) + yy * np.sin(t), -xx * np.sin(t) + yy * np.cos(t)
    study = Study(
        image=np.zeros((200, 200), np.float32), spacing=(1.0, 1.0), structures={"e": (u / 60) ** 2 + (v / 15) ** 2 <= 1}
    )
    r = run_tool(TOOLS, "measure", {"target": "e"}, ToolContext(study=study, tool_mode="oracle"))
    got = r.data["long_axis_angle_deg"]
    assert min(abs(got - angle), 180 - abs(got - angle)) <= 3.0
    assert r.data["longest_diameter_mm"] == pytest.approx(120, abs=2)


def test_overlay_draws_reversed_and_empty_model_boxes():
    """A model's answer box may be reversed or empty ([773, 100, 90, 94] was seen): drawing must not crash."""
    import numpy as np

    from medgym.tools.imaging import draw_overlay

    img = np.zeros((64, 64, 3), np.uint8)
    for box in ([773, 100, 90, 94], [10, 10, 10, 10], [40, 40, 20, 20]):
        assert draw_overlay(img, boxes=[box]).shape == (64, 64, 3)
    assert draw_overlay(img, boxes=[[40, 40, 20, 20]])[20:40, 20].any()  # the reversed box is drawn where it lies
