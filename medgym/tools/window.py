"""window: CT/MR intensity windowing (centre/width or a named preset), returned as an image."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medgym.tools.base import (
    SliceField,
    StudyField,
    StudyName,
    ToolArgs,
    ToolContext,
    ToolResult,
    ToolSpec,
)
from medgym.tools.imaging import WINDOW_PRESETS, apply_window


class WindowArgs(ToolArgs):
    preset: Literal["lung", "soft_tissue", "bone", "brain", "liver"] | None = Field(
        default=None, description="A named CT window; give either this or center and width."
    )
    center: float | None = Field(default=None, description="Window centre (level), in HU for CT.")
    width: float | None = Field(default=None, gt=0, description="Window width, in HU for CT.")
    slice_index: int | None = SliceField
    study: StudyName = StudyField

    @model_validator(mode="after")
    def _one_way(self) -> WindowArgs:
        if self.preset is None and (self.center is None or self.width is None):
            raise ValueError("give a preset, or both center and width")
        if self.preset is not None and (self.center is not None or self.width is not None):
            raise ValueError("give a preset or center/width, not both")
        return self


def window(args: WindowArgs, ctx: ToolContext) -> ToolResult:
    study = ctx.get_study(args.study)
    if args.preset is not None:
        center, width = WINDOW_PRESETS[args.preset]
        name = f"{args.preset} window"
    else:
        center, width = float(args.center), float(args.width)  # type: ignore[arg-type]
        name = "window"
    grey = apply_window(study.plane(args.slice_index), center, width)
    unit = "HU" if study.modality.upper() == "CT" else "intensity units"
    lo, hi = center - width / 2, center + width / 2
    text = f"Applied {name}: centre {center:g}, width {width:g} ({lo:g} to {hi:g} {unit})."
    rgb = grey[..., None].repeat(3, axis=2)
    return ToolResult(text=text, images=[rgb], data={"center": center, "width": width})


SPEC = ToolSpec(
    name="window",
    description="Re-display the image with an intensity window (CT presets: lung, soft_tissue, bone, "
    "brain, liver; or a centre and width) to bring out tissue contrast.",
    input_model=WindowArgs,
    fn=window,
    examples=({"preset": "lung"}, {"center": 50, "width": 350}),
    bad_examples=({"center": 50},),
)
