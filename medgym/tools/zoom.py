"""zoom: crop one or more boxes of the image and return them upsampled."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from medgym.tools.base import (
    BoxField,
    SliceField,
    StudyField,
    StudyName,
    ToolArgs,
    ToolContext,
    ToolResult,
    ToolSpec,
    check_box,
)
from medgym.tools.imaging import display_window, resize_rgb, to_display

Box = Annotated[list[float], BoxField]


class ZoomArgs(ToolArgs):
    boxes: list[Box] = Field(
        description="One to four boxes [x0, y0, x1, y1] in original-image pixels to look at closely.",
        min_length=1,
        max_length=4,
    )
    size: int = Field(default=224, ge=32, le=512, description="Length in pixels of the longer side of each crop.")
    slice_index: int | None = SliceField
    study: StudyName = StudyField


def zoom(args: ZoomArgs, ctx: ToolContext) -> ToolResult:
    study = ctx.get_study(args.study)
    plane = study.plane(args.slice_index)
    window = display_window(plane, study.modality)  # of the whole plane, so crops match the full view
    crops, boxes, lines = [], [], []
    for i, box in enumerate(args.boxes, start=1):
        x0, y0, x1, y1 = check_box(box, study.shape2d)
        crop = to_display(plane[y0:y1, x0:x1], study.modality, window)
        h, w = crop.shape[:2]
        scale = args.size / max(h, w)
        crop = resize_rgb(crop, (max(1, round(w * scale)), max(1, round(h * scale))))
        crops.append(crop)
        boxes.append([x0, y0, x1, y1])
        lines.append(f"crop {i}: box [{x0}, {y0}, {x1}, {y1}] shown at {scale:.1f}x")
    return ToolResult(text="Zoomed " + "; ".join(lines) + ".", images=crops, data={"boxes": boxes})


SPEC = ToolSpec(
    name="zoom",
    description="Crop one or more boxes of the image and show them enlarged, to inspect small findings.",
    input_model=ZoomArgs,
    fn=zoom,
    examples=({"boxes": [[10, 20, 90, 120]]}, {"boxes": [[0, 0, 64, 64], [100, 100, 200, 180]], "size": 128}),
    bad_examples=({"boxes": [[5000, 5000, 6000, 6000]]}, {"boxes": [[50, 50, 10, 10]]}),
)
