"""What a chat is about: a phantom case or an uploaded image, named by a small JSON reference.

The agent's checkpointed state never holds pixels. It holds a *study reference*:

- ``{"kind": "phantom", "seed": 3, "size": 256}`` — a phantom case, regenerated from its seed
  (sources are deterministic, so the same seed gives the same pixels, masks and expert trace);
- ``{"kind": "upload", "id": "<32 hex>"}`` — an uploaded image, saved once by :class:`UploadStore`
  as ``<data>/uploads/<id>.npz`` (pixels in their original units, spacing, modality).

Uploads are validated where they enter: a size limit on the bytes, a whitelist of formats
(PNG, JPEG, DICOM, NIfTI), a limit on pixels and voxels, and ids that must match a strict
pattern and resolve inside the upload folder. Every refusal is an :class:`UploadError` whose
message says what to do instead.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from medgym.environments.case import Case
from medgym.tools.base import Study
from medgym.tools.imaging import to_display

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 64 * 1024 * 1024
MAX_SIDE = 8192
MAX_VOXELS = 100_000_000
UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")

ERR_TOO_LARGE = "The file is {size} bytes; the limit is {limit} bytes. Upload a smaller file (one series or slice)."
ERR_EMPTY = "The file is empty. Choose an image file (PNG, JPEG, DICOM or NIfTI)."
ERR_NOT_IMAGE = (
    "This is not an image medgym can read ({details}). Upload a PNG, JPEG, DICOM (.dcm) or NIfTI (.nii/.nii.gz) file."
)
ERR_BAD_DICOM = "The DICOM file could not be read ({details}). Export the series again, or upload a PNG of the slice."
ERR_BAD_NIFTI = "The NIfTI file could not be read ({details}). Check the file, or upload a PNG of the slice."
ERR_DIMENSIONS = (
    "The image is {shape}: more than {max_side} pixels on a side or {max_voxels} voxels in all. "
    "Upload a smaller image (crop or downsample it)."
)
ERR_BAD_ID = "Unknown upload id {id!r}: ids are 32 hexadecimal characters returned by the upload."
ERR_NO_UPLOAD = "No upload with id {id!r} here. Upload the image again."
ERR_BAD_REF = "Unknown study reference {ref!r}: expected kind 'phantom' or 'upload'."


class UploadError(ValueError):
    """A refused upload or study reference; the message says how to fix it."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class LoadedStudy:
    """A study and, for phantom references, the case it belongs to."""

    study: Study
    case: Case | None = None
    name: str = ""


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) < 2 or max(shape[-2:]) > MAX_SIDE or int(np.prod(shape)) > MAX_VOXELS or min(shape) < 1:
        raise UploadError(
            ERR_DIMENSIONS.format(shape=" x ".join(map(str, shape)), max_side=MAX_SIDE, max_voxels=MAX_VOXELS), 413
        )


def _from_picture(data: bytes) -> Study:
    Image.MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE  # PIL refuses decompression bombs beyond this
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_shape((img.height, img.width))
            img.load()
            grey = np.asarray(img.convert("L"), dtype=np.float32)
    except UploadError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as exc:
        raise UploadError(ERR_NOT_IMAGE.format(details=type(exc).__name__)) from exc
    return Study(image=grey, spacing=(1.0, 1.0), modality="OT", meta={"spacing_known": False})


def _via_realdata(data: bytes, suffix: str) -> Study | None:
    """Load with the project's real-data loader (orientation, spacing, PHI stripping), when it is installed."""
    try:
        from medgym.environments.realdata.loaders import load_study as load_real
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        study = load_real(path)
    meta = json.loads(json.dumps(study.meta, default=str))
    meta.pop("source_file", None)
    meta["spacing_known"] = str(meta.get("spacing_source", "header")).startswith("header")
    study.meta = meta
    return study


def _from_dicom(data: bytes) -> Study:
    import pydicom

    try:
        header = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        rows, cols = int(header.Rows), int(header.Columns)
        frames = int(getattr(header, "NumberOfFrames", 1) or 1)
    except Exception as exc:  # pydicom raises many types on broken files
        raise UploadError(ERR_BAD_DICOM.format(details=f"{type(exc).__name__}: {str(exc)[:120]}")) from exc
    _check_shape((frames, rows, cols) if frames > 1 else (rows, cols))
    try:
        study = _via_realdata(data, ".dcm")
        if study is None:
            study = _dicom_plain(data)
    except UploadError:
        raise
    except Exception as exc:
        raise UploadError(ERR_BAD_DICOM.format(details=f"{type(exc).__name__}: {str(exc)[:120]}")) from exc
    if study.modality == "unknown":
        study.modality = "OT"
    return study


def _dicom_plain(data: bytes) -> Study:
    """Fallback DICOM reading (pixels, rescale, spacing, modality) when the real-data loader is absent."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    pixels = ds.pixel_array.astype(np.float32)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4) and frames == 1:
        pixels = pixels[..., :3].mean(axis=-1)
    pixels = pixels * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    known = "PixelSpacing" in ds
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing) if known else (1.0, 1.0)
    modality = str(getattr(ds, "Modality", "OT") or "OT")
    # Only geometry and modality are kept: names, ids and dates (PHI) never leave this function.
    if pixels.ndim == 3:
        thickness = float(getattr(ds, "SliceThickness", 1.0) or 1.0)
        return Study(pixels, (thickness, row_mm, col_mm), modality, meta={"spacing_known": known})
    return Study(pixels, (row_mm, col_mm), modality, meta={"spacing_known": known})


def _from_nifti(data: bytes, gz: bool) -> Study:
    import nibabel as nib

    suffix = ".nii.gz" if gz else ".nii"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"upload{suffix}"
            path.write_bytes(data)
            shape = tuple(int(s) for s in nib.load(str(path)).shape[:3])  # header only: no voxels read yet
    except Exception as exc:
        raise UploadError(ERR_BAD_NIFTI.format(details=f"{type(exc).__name__}: {str(exc)[:120]}")) from exc
    _check_shape(shape)
    try:
        study = _via_realdata(data, suffix)
        if study is None:
            study = _nifti_plain(data, gz)
    except UploadError:
        raise
    except Exception as exc:
        raise UploadError(ERR_BAD_NIFTI.format(details=f"{type(exc).__name__}: {str(exc)[:120]}")) from exc
    if study.modality in ("unknown", "OT"):
        study.modality = "CT" if float(np.percentile(study.image, 1)) < -500 else "MR"
    return study


def _nifti_plain(data: bytes, gz: bool) -> Study:
    """Fallback NIfTI reading (voxel axes only, no reorientation) when the real-data loader is absent."""
    import nibabel as nib

    raw = gzip.decompress(data) if gz else data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.nii"
        path.write_bytes(raw)
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
    while arr.ndim > 3:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Study(arr.T.copy(), (zooms[1], zooms[0]), "OT", meta={"spacing_known": True})
    vol = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))  # NIfTI (x, y, z) -> (z, y, x)
    return Study(vol, (zooms[2], zooms[1], zooms[0]), "OT", meta={"spacing_known": True})


def load_upload_bytes(data: bytes, filename: str = "") -> Study:
    """Decode an uploaded file into a Study, or raise UploadError with a fix-it message."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(ERR_TOO_LARGE.format(size=len(data), limit=MAX_UPLOAD_BYTES), 413)
    if not data:
        raise UploadError(ERR_EMPTY)
    name = filename.lower()
    if data[128:132] == b"DICM" or name.endswith((".dcm", ".dicom")):
        return _from_dicom(data)
    if name.endswith(".nii.gz") or (data[:2] == b"\x1f\x8b" and ".nii" in name):
        return _from_nifti(data, gz=True)
    if name.endswith(".nii") or data[344:348] in (b"n+1\x00", b"ni1\x00"):
        return _from_nifti(data, gz=False)
    return _from_picture(data)


class UploadStore:
    """Uploaded studies under ``<root>``, one ``<id>.npz`` each; ids are checked before any path is made."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, upload_id: str) -> Path:
        if not isinstance(upload_id, str) or not UPLOAD_ID.match(upload_id):
            raise UploadError(ERR_BAD_ID.format(id=str(upload_id)[:80]), 404)
        path = (self.root / f"{upload_id}.npz").resolve()
        if path.parent != self.root:  # belt and braces: the pattern already forbids separators
            raise UploadError(ERR_BAD_ID.format(id=upload_id), 404)
        return path

    def save(self, study: Study, filename: str = "") -> str:
        upload_id = uuid.uuid4().hex
        meta = {"modality": study.modality, "filename": Path(filename).name[:200], **study.meta}
        tmp = self.root / f"{upload_id}.tmp.npz"
        np.savez_compressed(tmp, image=study.image, spacing=np.asarray(study.spacing), meta=json.dumps(meta))
        tmp.replace(self.path(upload_id))
        return upload_id

    def load(self, upload_id: str) -> Study:
        path = self.path(upload_id)
        if not path.exists():
            raise UploadError(ERR_NO_UPLOAD.format(id=upload_id), 404)
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            return Study(
                image=z["image"],
                spacing=tuple(float(s) for s in z["spacing"]),
                modality=meta.pop("modality", "OT"),
                meta=meta,
            )


_CACHE: OrderedDict[str, LoadedStudy] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 64


def load_study(ref: dict[str, Any], uploads: UploadStore | None = None) -> LoadedStudy:
    """The study (and case) a reference names; recently used ones come from a small cache."""
    key = json.dumps(ref, sort_keys=True) + "|" + (str(uploads.root) if uploads else "")
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    kind = ref.get("kind") if isinstance(ref, dict) else None
    if kind == "phantom":
        from medgym.environments.sources import PhantomSource

        case = PhantomSource(size=int(ref.get("size", 256))).case(int(ref["seed"]))
        loaded = LoadedStudy(study=case.study, case=case, name=case.case_id)
    elif kind == "upload":
        if uploads is None:
            raise UploadError("This agent has no upload folder; start it with a data folder to chat over uploads.")
        study = uploads.load(str(ref.get("id")))
        loaded = LoadedStudy(study=study, name=f"upload-{ref['id'][:8]}")
    else:
        raise UploadError(ERR_BAD_REF.format(ref=ref))
    with _CACHE_LOCK:
        _CACHE[key] = loaded
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return loaded


def question_images(loaded: LoadedStudy) -> list[np.ndarray]:
    """The pictures shown with the question: the current plane, and the prior's for follow-up cases."""
    from medgym.environments.contract import question_images as case_question_images

    if loaded.case is not None:
        return case_question_images(loaded.case)
    return [to_display(loaded.study.plane(), loaded.study.modality)]


def question_text(loaded: LoadedStudy, question: str | None = None, tool_mode: str = "predicted") -> str:
    """The question as the env words it for cases; a description of the image plus the question for uploads."""
    from medgym.environments.contract import describe_study
    from medgym.environments.contract import question_text as case_question_text

    if loaded.case is not None and question is None:
        return case_question_text(loaded.case, tool_mode)
    lines = describe_study(loaded.study, tool_mode=tool_mode)
    lines.append(question or (loaded.case.prompt() if loaded.case else ""))
    return "\n".join(lines)
