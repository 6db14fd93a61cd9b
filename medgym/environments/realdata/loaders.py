"""Loading real images and label maps into :class:`~medgym.tools.base.Study` objects.

Formats:

- NIfTI (``.nii`` / ``.nii.gz``) and DICOM (one file, or a folder holding one series) are
  read with MONAI (``LoadImage(image_only=False)``) and reoriented with ``Orientation``
  to LPS, then transposed to the project's axial convention ``(Z, H, W)`` =
  (inferior->superior, anterior->posterior, patient right->patient left): the usual
  radiological display, with the patient's right on the image's left. Spacing comes
  from the reoriented affine (the header), never assumed.
- PNG / JPEG / TIFF are 2D pictures ``(H, W)`` read with PIL / tifffile (MONAI's PIL
  reader transposes and its TIFF path needs ITK, neither of which buys anything for a
  flat picture). Their pixel size is unknown: spacing is 1.0 per pixel *unless* a
  sidecar ``<file>.json`` gives ``{"spacing": [row_mm, col_mm]}``; ``Study.meta``
  says which (``spacing_source``). Colour pictures become luminance.

Label maps go through the same reader and orientation as their image and must land on
the same grid. Each label becomes one boolean structure (names from an MSD
``dataset.json`` ``labels`` when given, else ``label_<k>``); labels whose name looks
like a lesion (tumour, cancer, nodule, metastasis ...) are named ``lesion_<name>`` and
their union is split into connected components ``lesion_1..n`` (largest first) plus a
``lesion`` union, the convention of :mod:`medgym.environments.templates`. An organ label
is widened by the lesion components it encloses, so a liver tumour lies "in the liver".

DICOM headers are reduced by :func:`strip_phi` to a whitelist of technical tags: no
patient-identifying tag ever reaches ``Study.meta``. Unreadable files raise a
``ValueError`` that names the file; :func:`safe_path` keeps every path inside the data
folder (``..`` escapes and symlinks out are refused).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medgym.tools.base import Study
from medgym.tools.measure import components

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (".dcm", ".dicom")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LESION_WORDS = re.compile(
    r"lesion|tumou?r|cancer|carcinoma|nodule|metasta|neoplas|mass|cyst|polyp|edema|oedema|enhancing|necro",
    re.IGNORECASE,
)
MAX_LESION_STRUCTURES = 20  # lesion_1..lesion_20: each is a full-size mask, and real livers can hold hundreds

# DICOM tags that describe the acquisition, not the person. Anything not listed is dropped.
SAFE_DICOM_TAGS = (
    "Modality",
    "BodyPartExamined",
    "Manufacturer",
    "ManufacturerModelName",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "BitsStored",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "KVP",
    "ConvolutionKernel",
    "MagneticFieldStrength",
    "RepetitionTime",
    "EchoTime",
    "ImageType",
    "SOPClassUID",
    "PatientPosition",
    "ImageOrientationPatient",
)
# Named for the tests and for readers: these must never leave strip_phi.
PHI_DICOM_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientAddress",
    "OtherPatientIDs",
    "InstitutionName",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyDate",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)


# ---------------------------------------------------------------- paths


def safe_path(root: str | Path, candidate: str | Path) -> Path:
    """``candidate`` (absolute or relative to ``root``) resolved, refused unless it stays inside ``root``.

    Symlinks are resolved first, so a link pointing out of the folder is refused like ``..``.
    """
    base = Path(root).resolve()
    path = Path(candidate)
    full = (path if path.is_absolute() else base / path).resolve()
    if not full.is_relative_to(base):
        raise ValueError(f"path {str(candidate)!r} leaves the data folder {str(base)!r}; keep every file inside it")
    if not full.exists():
        raise ValueError(f"file {str(candidate)!r} does not exist in the data folder {str(base)!r}")
    return full


def strip_name(path: Path) -> str:
    """A file or folder name without its image suffix (``case_1.nii.gz`` -> ``case_1``)."""
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *DICOM_SUFFIXES, *PICTURE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_image_path(path: Path) -> bool:
    name = path.name.lower()
    if path.is_dir():
        return any(p.suffix.lower() in DICOM_SUFFIXES for p in path.iterdir())
    return name.endswith((*NIFTI_SUFFIXES, *DICOM_SUFFIXES, *PICTURE_SUFFIXES))


# ---------------------------------------------------------------- PHI


def _plain(value: Any) -> Any:
    """A DICOM value as JSON-friendly Python (MultiValue -> list, DSfloat -> float)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str)):
        number = type(value).__name__ in ("DSfloat", "IS", "DSdecimal")
        return float(value) if number else (str(value) if isinstance(value, str) else value)
    if type(value).__name__ == "UID":
        return str(value)
    return str(value)


def strip_phi(dataset: Any) -> dict[str, Any]:
    """The safe technical tags of a pydicom dataset as a plain dict; everything else is dropped.

    A whitelist, not a blacklist: a tag is kept only when it is in ``SAFE_DICOM_TAGS``,
    so private tags and any patient, institution, date or UID tag never pass.

    >>> from pydicom.dataset import Dataset
    >>> ds = Dataset(); ds.PatientName = "Doe^Jane"; ds.PatientID = "123"; ds.Modality = "CT"
    >>> strip_phi(ds)
    {'Modality': 'CT'}
    """
    out: dict[str, Any] = {}
    for keyword in SAFE_DICOM_TAGS:
        if keyword in dataset:
            value = dataset.get(keyword)
            if value is None or value == "":
                continue
            out[keyword] = _plain(value)
    return out


# ---------------------------------------------------------------- readers


def _monai_read(path: Path, reader: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """(array (X, Y, Z) in LPS order, 4x4 affine after reorientation, channels in the file) of a 3D image.

    Multi-channel volumes (the Decathlon's 4-sequence brain MRI) give their first channel.
    """
    from monai.transforms import EnsureChannelFirst, LoadImage, Orientation

    try:
        img = LoadImage(image_only=True, reader=reader)(str(path))  # the meta rides on the MetaTensor
        img = EnsureChannelFirst()(img)
        if img.ndim != 4:
            raise ValueError(f"expected a 3D volume, got spatial shape {tuple(img.shape[1:])}")
        oriented = Orientation(axcodes="LPS")(img)
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:  # readers raise anything from struct.error to RuntimeError on corrupt files
        raise ValueError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    affine = np.asarray(oriented.affine, dtype=np.float64)
    return np.asarray(oriented[0]), affine, int(oriented.shape[0])


def _zhw(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    """LPS (X, Y, Z) -> (Z, H, W) with spacing from the affine's column norms; 2D when Z == 1."""
    # float32 headers store 0.7 as 0.69999999: six decimals are what the header really says.
    spacing_xyz = np.round(np.linalg.norm(affine[:3, :3], axis=0), 6)
    vol = np.ascontiguousarray(np.transpose(array, (2, 1, 0)))
    spacing = (float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0]))
    if vol.shape[0] == 1:
        return vol[0], spacing[1:]
    return vol, spacing


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    import nibabel as nib

    try:
        codes = "".join(nib.aff2axcodes(nib.load(str(path)).affine))
    except Exception as exc:
        raise ValueError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    array, affine, channels = _monai_read(path, "NibabelReader")
    image, spacing = _zhw(array, affine)
    # The header's free-text fields (descrip, aux_file) may name the patient: they are not kept.
    meta = {"format": "nifti", "original_axcodes": codes, "spacing_source": "header"}
    if channels > 1:
        meta["channel"] = f"first of {channels} channels"
    return image, spacing, meta


def _dicom_header(path: Path) -> Any:
    import pydicom

    first = path
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        if not files:
            raise ValueError(f"cannot read {path}: the DICOM folder is empty")
        first = files[0]
    try:
        return pydicom.dcmread(str(first), stop_before_pixels=True)
    except Exception as exc:
        raise ValueError(f"cannot read {first}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def _read_dicom(path: Path) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    header = _dicom_header(path)
    safe = strip_phi(header)
    if path.is_file() and int(safe.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"cannot read {path}: multi-frame DICOM is not supported; give a folder of single frames")
    if path.is_file():
        # One slice or projection: rows x columns as stored is already the display orientation
        # (and radiographs / ultrasound carry no patient geometry to reorient by).
        image, spacing, meta = _read_dicom_plain(path, header)
    else:
        from monai.data import PydicomReader

        array, affine, _ = _monai_read(path, PydicomReader(swap_ij=True))
        image, spacing = _zhw(array, affine)
        meta = {"spacing_source": "header"}
    meta.update(format="dicom", dicom=safe)
    return image, spacing, meta


def _read_dicom_plain(path: Path, header: Any) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    """A single projection or picture-like DICOM (CR, DX, US, secondary capture): rows x columns as stored."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise ValueError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        if str(ds.get("PhotometricInterpretation", "RGB")).startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, str(ds.PhotometricInterpretation), "RGB").astype(np.float32)
        pixels = _luminance(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"cannot read {path}: expected one 2D frame, got shape {pixels.shape}")
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    spacing, source = (1.0, 1.0), "assumed 1.0 per pixel (no usable PixelSpacing in the header)"
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            spacing, source = (float(value[0]), float(value[1])), f"header {tag}"
            break
    return pixels, spacing, {"spacing_source": source}


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.float32)


def _read_picture(path: Path, as_labels: bool = False) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            pixels = np.asarray(tifffile.imread(str(path)))
        else:
            from PIL import Image

            with Image.open(path) as pic:
                pic.load()
                # A palette label map keeps its indices (the labels); a palette picture becomes colours.
                keep = pic.mode == "P" and as_labels
                pixels = np.asarray(pic.convert("RGB") if pic.mode in ("P", "CMYK", "LA", "RGBA") and not keep else pic)
    except Exception as exc:
        raise ValueError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = _luminance(pixels)
    if pixels.ndim != 2:
        raise ValueError(f"cannot read {path}: expected a 2D picture, got shape {pixels.shape}")
    spacing, source = (1.0, 1.0), "assumed 1.0 per pixel (no sidecar JSON with 'spacing')"
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.exists():
        sidecar = path.with_suffix(".json")
    if sidecar.exists():
        try:
            given = json.loads(sidecar.read_text())["spacing"]
            spacing = (float(given[0]), float(given[1]))
            if not all(np.isfinite(spacing)) or min(spacing) <= 0:
                raise ValueError("spacing must be two positive numbers")
        except (KeyError, TypeError, IndexError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f'bad sidecar {sidecar}: {exc}; write {{"spacing": [row_mm, col_mm]}}') from exc
        source = f"sidecar {sidecar.name}"
    return pixels.astype(np.float32), spacing, {"format": "picture", "spacing_source": source}


def read_image(path: str | Path, as_labels: bool = False) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    """(array (Z, H, W) or (H, W), spacing in mm on the same axes, safe meta) of one image file or DICOM folder.

    ``as_labels`` reads a palette PNG's indices rather than its colours.
    """
    path = Path(path)
    name = path.name.lower()
    if not path.exists():
        raise ValueError(f"cannot read {path}: no such file or folder")
    if path.is_dir() or name.endswith(DICOM_SUFFIXES):
        return _read_dicom(path)
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)
    if name.endswith(PICTURE_SUFFIXES):
        return _read_picture(path, as_labels)
    raise ValueError(
        f"cannot read {path}: unknown image format; use NIfTI (.nii/.nii.gz), DICOM (.dcm or a folder), PNG, JPEG or TIFF"
    )


# ---------------------------------------------------------------- label maps -> structures


def structure_name(label: str) -> str:
    """A label's structure name: lower snake case, ``lesion_`` in front of lesion-like labels."""
    name = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "label"
    if LESION_WORDS.search(name) and not name.startswith("lesion"):
        name = f"lesion_{name}"
    if re.fullmatch(r"lesion_\d+", name) or name == "lesion":
        name = f"{name}_label"  # keep lesion_<k> and lesion free for the components
    return name


def structures_from_labels(labels: np.ndarray, names: dict[int, str] | None = None) -> dict[str, np.ndarray]:
    """One boolean mask per label value (0 is background), lesions split into ``lesion_1..n``."""
    values = [int(v) for v in np.unique(labels) if v != 0]
    names = names or {}
    out: dict[str, np.ndarray] = {}
    lesion_union = np.zeros(labels.shape, dtype=bool)
    for value in sorted(set(values) | set(k for k in names if k != 0)):
        label = names.get(value, f"label_{value}")
        name = structure_name(label)
        mask = labels == value
        out[name] = mask
        if name.startswith("lesion"):
            lesion_union |= mask
    if not any(n.startswith("lesion") for n in out):
        return out
    comps = components(lesion_union)
    for name in [n for n in out if not n.startswith("lesion")]:
        # An organ holds the lesions that touch it (MSD labels a liver tumour apart from the liver).
        grown = ndimage.binary_dilation(out[name], iterations=1)
        for comp in comps:
            if np.logical_and(comp, grown).any():
                out[name] = out[name] | comp
    out["lesion"] = lesion_union
    for k, comp in enumerate(comps[:MAX_LESION_STRUCTURES], start=1):
        out[f"lesion_{k}"] = comp
    return out


def display_slice(structures: dict[str, np.ndarray], shape: tuple[int, ...]) -> int | None:
    """For volumes: the slice where the lesions cover the largest area, else where the labels do."""
    if len(shape) != 3:
        return None
    for key in ("lesion", None):
        if key is None:
            masks = [m for n, m in structures.items()]
        else:
            masks = [structures[key]] if key in structures else []
        if masks:
            area = np.logical_or.reduce(masks).sum(axis=(1, 2))
            if area.any():
                return int(np.argmax(area))
    return shape[0] // 2


def load_study(
    image_path: str | Path,
    label_path: str | Path | None = None,
    label_names: dict[int, str] | None = None,
    modality: str | None = None,
    root: str | Path | None = None,
) -> Study:
    """A Study from an image and an optional label map (both inside ``root`` when given)."""
    if root is not None:
        image_path = safe_path(root, image_path)
        label_path = safe_path(root, label_path) if label_path is not None else None
    image, spacing, meta = read_image(image_path)
    structures: dict[str, np.ndarray] = {}
    if label_path is not None:
        labels, label_spacing, _ = read_image(label_path, as_labels=True)
        if labels.shape != image.shape:
            raise ValueError(
                f"label map {label_path} has shape {labels.shape} but image {image_path} has {image.shape}; "
                "they must share one grid"
            )
        if not np.allclose(labels, np.round(labels)):
            raise ValueError(f"label map {label_path} holds non-integer values; labels must be whole numbers")
        if not np.allclose(label_spacing, spacing, rtol=1e-3):
            raise ValueError(f"label map {label_path} spacing {label_spacing} differs from the image's {spacing}")
        structures = structures_from_labels(np.round(labels).astype(np.int32), label_names)
    dicom = meta.get("dicom", {})
    mod = modality or dicom.get("Modality") or "unknown"
    mod = "MR" if mod.upper() in ("MRI", "MR") else mod
    meta.update(source_file=Path(image_path).name, spacing_mm=list(spacing))
    if label_path is not None:
        meta["label_file"] = Path(label_path).name
    if f"lesion_{MAX_LESION_STRUCTURES}" in structures:
        meta["lesion_structures_note"] = f"more lesions than {MAX_LESION_STRUCTURES}; only the largest are named"
    return Study(
        image=np.asarray(image, dtype=np.float32),
        spacing=tuple(float(s) for s in spacing),
        modality=str(mod),
        structures=structures,
        display_slice=display_slice(structures, image.shape),
        meta=meta,
    )


__all__ = [
    "PHI_DICOM_TAGS",
    "SAFE_DICOM_TAGS",
    "load_study",
    "read_image",
    "safe_path",
    "strip_phi",
    "structure_name",
    "structures_from_labels",
]
