"""Turning studies into pictures: windowing, display conversion, overlays, resizing."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Named CT windows (centre, width) in HU, as radiologists use them.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
}

FLOAT32_SAFE = 1e30  # windows with bounds below this are computed in float32

OVERLAY_COLOURS = [(255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120)]


def apply_window(plane: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map intensities to 0-255 with a linear window; uint8 (H, W)."""
    lo, width = center - width / 2.0, max(width, 1e-6)
    # float32 is exact enough for any real window; one beyond its range (a model may ask for one) is
    # worked out in float64, where it stays finite (in float32 it became inf / inf = NaN pixels).
    dtype = np.float32 if abs(lo) < FLOAT32_SAFE and width < FLOAT32_SAFE else np.float64
    with np.errstate(over="ignore"):  # lo itself may overflow to -inf/inf: the clip maps that to black/white
        out = (plane.astype(dtype) - lo) / width
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def auto_window(plane: np.ndarray) -> tuple[float, float]:
    """Centre/width from the 0.5-99.5 percentiles, for images without HU calibration."""
    lo, hi = np.percentile(plane, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return float((lo + hi) / 2.0), float(hi - lo)


def display_window(plane: np.ndarray, modality: str = "CT") -> tuple[float, float]:
    """The window a plane is shown in: soft tissue for CT, percentiles of the plane otherwise."""
    return WINDOW_PRESETS["soft_tissue"] if modality.upper() == "CT" else auto_window(plane)


def to_display(plane: np.ndarray, modality: str = "CT", window: tuple[float, float] | None = None) -> np.ndarray:
    """A 2D plane as an RGB uint8 picture, in ``window`` or its display window."""
    if plane.ndim == 3 and plane.shape[-1] == 3 and plane.dtype == np.uint8:
        return plane
    grey = apply_window(plane, *(window or display_window(plane, modality)))
    return np.repeat(grey[..., None], 3, axis=2)


def resize_rgb(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 picture to (width, height) with bicubic interpolation."""
    return np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))


def draw_overlay(
    rgb: np.ndarray,
    masks: list[np.ndarray] = (),  # type: ignore[assignment]
    boxes: list[list[float]] = (),  # type: ignore[assignment]
    alpha: float = 0.35,
) -> np.ndarray:
    """Blend masks (filled, tinted) and draw boxes (outlines) onto an RGB picture."""
    out = rgb.astype(np.float32).copy()
    for i, mask in enumerate(masks):
        colour = np.array(OVERLAY_COLOURS[i % len(OVERLAY_COLOURS)], dtype=np.float32)
        m = mask.astype(bool)
        out[m] = (1 - alpha) * out[m] + alpha * colour
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for i, box in enumerate(boxes):
        x0, x1 = sorted((float(box[0]), float(box[2])))  # a model's box may come reversed or empty
        y0, y1 = sorted((float(box[1]), float(box[3])))
        draw.rectangle(
            [x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)],
            outline=OVERLAY_COLOURS[i % len(OVERLAY_COLOURS)],
            width=2,
        )
    return np.asarray(pil)
