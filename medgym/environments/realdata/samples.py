"""``SamplesSource`` (``--source samples``): real cases from images shipped in installed wheels.

No download: every file comes from a wheel already installed, and a sample whose
package is missing is left out (``available_templates()`` says which are in).

- **stardist** ``data/images/img2d.tif`` + ``mask2d.tif``: fluorescence nuclei with an
  instance mask. Structures ``nucleus_1..n`` (largest first) and ``nuclei``, the union
  with a one-pixel gap wherever two nuclei touch, so that its connected components are
  the nuclei (the count the ``segment`` tool reports). The picture has no calibration:
  spacing is 1.0 per pixel and sizes are in pixels (``Study.meta`` says so).
- **nilearn** MNI152 2009 T1 template with brain, grey-matter and white-matter masks made
  by nilearn's own rules (``load_mni152_brain_mask``: T1 / max > 0.2;
  ``load_mni152_gm_mask`` / ``wm_mask``: probability / max > 0.2 then
  ``binary_closing(iterations=2)``), read by path through the MONAI loader (1 mm).
- **pydicom** ``CT_small.dcm`` / ``MR_small.dcm`` and, when **pydicom-data** is installed,
  the ``RG1_UNCR.dcm`` computed radiograph and ``US1_UNCR.dcm`` ultrasound; PHI is
  stripped on load. Point questions use a 3 x 3 structure ``roi`` that ``measure`` reads.
- **scikit-image**'s ``retina.jpg`` and ``ihc.png`` are bundled in its wheel (no
  download; read by path, as luminance). They have no masks, so they only serve a
  recognition question (which kind of picture), with ``modality`` set to the neutral
  ``photograph`` so the prompt does not give the answer away.

Every case carries an expert trace of real tool calls whose outputs contain the answer.
``case(seed)`` takes template ``seed % n`` (so seeds ``0..n-1`` cover every sample once)
and draws the rest (points, thresholds, choice order) from a generator seeded by ``seed``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medgym.environments.case import AnswerType, Case, Stage, ToolCall, box_text
from medgym.environments.realdata.loaders import load_study, read_image
from medgym.environments.templates import DENSITY_CATEGORIES, choice, density_category, far_from, fmt, make_case
from medgym.tools.base import Study, mask_box
from medgym.tools.imaging import WINDOW_PRESETS
from medgym.tools.measure import components, mask_metrics

log = logging.getLogger(__name__)

NILEARN_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
TISSUES = ("grey matter", "white matter")
SHADES = ("black (below the window)", "a shade of grey (inside the window)", "white (above the window)")
MODALITY_CHOICES = {"CT": "CT", "MR": "MR", "CR": "radiograph", "DX": "radiograph", "US": "ultrasound"}


# ---------------------------------------------------------------- data files


def package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it (stardist pulls in TensorFlow)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def stardist_files() -> tuple[Path, Path] | None:
    folder = package_dir("stardist")
    if folder is None:
        return None
    img, mask = folder / "data" / "images" / "img2d.tif", folder / "data" / "images" / "mask2d.tif"
    return (img, mask) if img.exists() and mask.exists() else None


def nilearn_files() -> dict[str, Path] | None:
    folder = package_dir("nilearn")
    if folder is None:
        return None
    files = {k: folder / "datasets" / "data" / v for k, v in NILEARN_FILES.items()}
    return files if all(p.exists() for p in files.values()) else None


def dicom_file(name: str) -> Path | None:
    """A pydicom / pydicom-data test file by name, never downloaded."""
    if importlib.util.find_spec("pydicom") is None:
        return None
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name, download=False)
    return Path(found) if isinstance(found, str) and Path(found).exists() else None


def touching_gap(instances: np.ndarray) -> np.ndarray:
    """Foreground of an instance map minus every pixel that touches (8-neighbourhood) another instance."""
    footprint = np.ones((3,) * instances.ndim, dtype=bool)
    fg = instances > 0
    top = ndimage.maximum_filter(instances, footprint=footprint)
    sentinel = np.iinfo(instances.dtype).max if instances.dtype.kind in "ui" else np.inf
    bottom = ndimage.minimum_filter(np.where(fg, instances, sentinel), footprint=footprint)
    return fg & (top == instances) & (bottom == instances)


@lru_cache(maxsize=1)
def nuclei_study() -> Study | None:
    files = stardist_files()
    if files is None:
        return None
    import tifffile

    image = tifffile.imread(str(files[0])).astype(np.float32)
    instances = tifffile.imread(str(files[1])).astype(np.int32)
    labels, counts = np.unique(instances[instances > 0], return_counts=True)
    order = labels[np.lexsort((labels, -counts))]  # largest first, ties by label
    structures = {f"nucleus_{k}": instances == lab for k, lab in enumerate(order, start=1)}
    structures["nuclei"] = touching_gap(instances)
    return Study(
        image=image,
        spacing=(1.0, 1.0),
        modality="fluorescence microscopy",
        structures=structures,
        meta={
            "sample": "stardist img2d/mask2d",
            "spacing_source": "assumed 1.0 per pixel: the sample has no calibration; sizes are in pixels",
            "nuclei_note": "'nuclei' leaves a 1-pixel gap where nuclei touch, so its components are the nuclei",
        },
    )


@lru_cache(maxsize=1)
def brain_study() -> Study | None:
    files = nilearn_files()
    if files is None:
        return None
    t1 = load_study(files["t1"], modality="MR")
    gm, _, _ = read_image(files["gm"])
    wm, _, _ = read_image(files["wm"])
    structures = {
        "brain": t1.image / t1.image.max() > 0.2,
        "grey_matter": ndimage.binary_closing(gm / gm.max() > 0.2, iterations=2),
        "white_matter": ndimage.binary_closing(wm / wm.max() > 0.2, iterations=2),
    }
    areas = structures["brain"].sum(axis=(1, 2))
    # Show a slice well away from the largest one, so "which slice is largest" is not read off the prompt.
    z = int(round(0.62 * t1.image.shape[0]))
    meta = dict(t1.meta, sample="nilearn MNI152 2009 sym T1 template", masks="nilearn's thresholds (0.2, closing 2)")
    meta["largest_brain_slice"] = int(np.argmax(areas))
    return Study(image=t1.image, spacing=t1.spacing, modality="MR", structures=structures, display_slice=z, meta=meta)


PHOTOS = {"retina.jpg": "retinal fundus photograph", "ihc.png": "immunohistochemistry slide"}


def photo_file(name: str) -> Path | None:
    folder = package_dir("skimage")
    path = None if folder is None else folder / "data" / name
    return path if path is not None and path.exists() else None


@lru_cache(maxsize=2)
def photo_study(name: str) -> Study | None:
    path = photo_file(name)
    if path is None:
        return None
    image, spacing, meta = read_image(path)
    meta.update(sample=f"scikit-image {name}", kind=PHOTOS[name])
    return Study(image=image, spacing=spacing, modality="photograph", meta=meta)


@lru_cache(maxsize=8)
def dicom_study(name: str) -> Study | None:
    path = dicom_file(name)
    if path is None:
        return None
    study = load_study(path)
    study.meta["sample"] = name
    return study


# ---------------------------------------------------------------- helpers


def with_roi(study: Study, centre: tuple[int, ...], half: int = 1) -> Study:
    """A shallow copy of ``study`` with a (2 half + 1)^2 in-plane structure ``roi`` at ``centre``."""
    roi = np.zeros(study.image.shape, dtype=bool)
    if study.is_3d:
        z, y, x = centre
        roi[z, y - half : y + half + 1, x - half : x + half + 1] = True
    else:
        y, x = centre
        roi[y - half : y + half + 1, x - half : x + half + 1] = True
    return Study(
        image=study.image,
        spacing=study.spacing,
        modality=study.modality,
        structures={**study.structures, "roi": roi},
        display_slice=study.display_slice,
        meta=study.meta,
    )


def homogeneous_points(plane: np.ndarray, keep: Callable[[float], bool], step: int = 4) -> list[tuple[int, int]]:
    """Centres of 3 x 3 patches (away from the border) whose mean passes ``keep`` and that vary little."""
    mean = ndimage.uniform_filter(plane.astype(np.float64), 3)
    sq = ndimage.uniform_filter(plane.astype(np.float64) ** 2, 3)
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    h, w = plane.shape
    out = []
    for y in range(4, h - 4, step):
        for x in range(4, w - 4, step):
            if std[y, x] <= 25.0 and keep(float(mean[y, x])):
                out.append((y, x))
    return out


def roi_text(centre: tuple[int, ...]) -> str:
    y, x = centre[-2:]
    return f"the 3 x 3 pixel region 'roi' centred at column {x}, row {y}"


def measure_roi() -> ToolCall:
    return ToolCall("measure", {"target": "roi"})


@dataclass(frozen=True)
class SampleTemplate:
    """A question on one bundled sample: ``build(rng)`` returns the case fields, or None."""

    name: str
    stage: Stage
    answer_type: AnswerType
    study: Callable[[], Study | None]
    build: Callable[[Study, np.random.Generator], dict[str, Any] | None]


# ---------------------------------------------------------------- nuclei


def nuclei(study: Study) -> list[np.ndarray]:
    return components(study.structures["nuclei"])


def build_nuclei_count(study: Study, rng: np.random.Generator) -> dict[str, Any]:
    return {
        "question": "How many cell nuclei are in this fluorescence image?",
        "answer": str(len(nuclei(study))),
        "calls": [ToolCall("segment", {"structure": "nuclei"})],
    }


def build_largest_nucleus_area(study: Study, rng: np.random.Generator) -> dict[str, Any]:
    comps = nuclei(study)
    m = mask_metrics(comps[0], study.spacing, study.image)
    return {
        "question": "This picture has no pixel calibration (sizes are in pixels; the tools report 1 pixel as "
        "1 mm). What is the area of the largest nucleus, in square pixels?",
        "answer": fmt(m["area_mm2"], 1),
        "unit": "pixels",
        "tolerance": 0.05,
        "abs_tolerance": 2.0,
        "answer_box": [float(v) for v in mask_box(comps[0])],
        "calls": [
            ToolCall("segment", {"structure": "nuclei"}),
            ToolCall("measure", {"target": "mask_1", "component": 1}),
        ],
    }


def build_nuclei_above(study: Study, rng: np.random.Generator) -> dict[str, Any] | None:
    areas = sorted((float(c.sum()) for c in nuclei(study)), reverse=True)
    # Thresholds that only the larger nuclei pass, so the answer stays in the first lines of measure's list.
    candidates = [
        t for t in range(100, 2000, 5) if far_from(t, tuple(areas), 2.0) and 3 <= sum(a >= t for a in areas) <= 15
    ]
    if not candidates:
        return None
    threshold = int(rng.choice(candidates))
    return {
        "question": f"Sizes are in pixels (no calibration). How many nuclei have an area of at least {threshold} "
        "square pixels?",
        "answer": str(sum(a >= threshold for a in areas)),
        "calls": [ToolCall("segment", {"structure": "nuclei"}), ToolCall("measure", {"target": "mask_1"})],
    }


def build_largest_nucleus_box(study: Study, rng: np.random.Generator) -> dict[str, Any]:
    box = [float(v) for v in mask_box(nuclei(study)[0])]
    return {
        "question": "Where is the largest nucleus? Give its bounding box.",
        "answer": box_text(box),
        "answer_box": box,
        "calls": [ToolCall("segment", {"structure": "nuclei"})],
    }


# ---------------------------------------------------------------- brain


def _volume(name: str, label: str) -> Callable[[Study, np.random.Generator], dict[str, Any]]:
    def build(study: Study, rng: np.random.Generator) -> dict[str, Any]:
        mask = study.structures[name]
        return {
            "question": f"What is the {label} volume of this brain (the '{name}' structure)?",
            "answer": fmt(int(mask.sum()) * float(np.prod(study.spacing)) / 1000.0, 1),
            "unit": "mL",
            "tolerance": 0.02,
            "abs_tolerance": 1.0,
            "calls": [ToolCall("segment", {"structure": name})],  # segment reports a named structure's volume
        }

    return build


def build_largest_slice(study: Study, rng: np.random.Generator) -> dict[str, Any]:
    areas = study.structures["brain"].sum(axis=(1, 2))
    return {
        "question": "Which axial slice (index) shows the largest cross-sectional area of the brain?",
        "answer": str(int(np.argmax(areas))),
        "calls": [ToolCall("segment", {"structure": "brain"})],
    }


def build_grey_vs_white(study: Study, rng: np.random.Generator) -> dict[str, Any]:
    gm, wm = int(study.structures["grey_matter"].sum()), int(study.structures["white_matter"].sum())
    return {
        "question": "Is the grey-matter volume of this brain larger than its white-matter volume?",
        "answer": "yes" if gm > wm else "no",
        "calls": [
            ToolCall("segment", {"structure": "grey_matter"}),
            ToolCall("segment", {"structure": "white_matter"}),
        ],
    }


def axial_slice(study: Study, z: int) -> Study:
    """One axial slice of a volume as a 2D study (in-plane spacing, the structures cut at ``z``)."""
    return Study(
        image=study.image[z],
        spacing=study.spacing[1:],
        modality=study.modality,
        structures={name: mask[z] for name, mask in study.structures.items()},
        meta={**study.meta, "axial_slice_of_volume": z},
    )


def build_tissue_at_point(volume: Study, rng: np.random.Generator) -> dict[str, Any] | None:
    z = int(volume.display_slice or 0)
    study = axial_slice(volume, z)  # a slice question: the 2D slice is the study, so tools work in-plane
    gm, wm = study.structures["grey_matter"], study.structures["white_matter"]
    tissue = str(rng.choice(TISSUES))
    only = gm & ~wm if tissue == TISSUES[0] else wm & ~gm
    core = ndimage.binary_erosion(only, structure=np.ones((3, 3), bool))  # the whole 3 x 3 roi in one tissue
    ys, xs = np.nonzero(core)
    if len(ys) == 0:
        return None
    i = int(rng.integers(len(ys)))
    centre = (int(ys[i]), int(xs[i]))
    options, letter = choice(rng, tissue, list(TISSUES))
    return {
        "study": with_roi(study, centre),
        "question": f"This is axial slice {z} of a T1 brain template. Which tissue lies at {roi_text(centre)}?",
        "choices": options,
        "answer": letter,
        # Edge distance 0 to grey_matter means the roi lies in it; otherwise it is in white matter.
        "calls": [ToolCall("measure", {"target": "roi", "to": "grey_matter"})],
    }


# ---------------------------------------------------------------- DICOM


def _point_case(
    study: Study, rng: np.random.Generator, keep: Callable[[float], bool]
) -> tuple[Study, tuple[int, int], float] | None:
    """A study with a small 'roi' at a homogeneous point, its centre, and the roi's mean intensity."""
    points = homogeneous_points(study.plane(), keep)
    if not points:
        return None
    centre = points[int(rng.integers(len(points)))]
    roi_study = with_roi(study, centre)
    hu = mask_metrics(roi_study.structures["roi"], study.spacing, study.image)["mean_intensity"]
    return roi_study, centre, hu


def build_hu_at_point(study: Study, rng: np.random.Generator) -> dict[str, Any] | None:
    got = _point_case(study, rng, lambda v: -200.0 < v < 300.0)
    if got is None:
        return None
    roi_study, centre, hu = got
    return {
        "study": roi_study,
        "question": f"What is the mean attenuation of {roi_text(centre)}?",
        "answer": fmt(hu, 1),
        "unit": "HU",
        "abs_tolerance": 5.0,
        "calls": [measure_roi()],
    }


def build_window_shade(study: Study, rng: np.random.Generator) -> dict[str, Any] | None:
    preset = str(rng.choice(sorted(WINDOW_PRESETS)))
    centre_hu, width = WINDOW_PRESETS[preset]
    lo, hi = centre_hu - width / 2, centre_hu + width / 2
    got = _point_case(study, rng, lambda v: far_from(v, (lo, hi), 20.0))
    if got is None:
        return None
    roi_study, centre, hu = got
    shade = SHADES[0] if hu < lo else (SHADES[2] if hu > hi else SHADES[1])
    options, letter = choice(rng, shade, list(SHADES))
    return {
        "study": roi_study,
        "question": f"In the {preset.replace('_', ' ')} window, how is {roi_text(centre)} displayed?",
        "choices": options,
        "answer": letter,
        "calls": [measure_roi(), ToolCall("window", {"preset": preset})],
    }


def build_density_at_point(study: Study, rng: np.random.Generator) -> dict[str, Any] | None:
    got = _point_case(study, rng, lambda v: -300.0 < v < 400.0 and far_from(v, (-10.0, 20.0, 100.0), 8.0))
    if got is None:
        return None
    roi_study, centre, hu = got
    options, letter = choice(rng, density_category(hu), list(DENSITY_CATEGORIES))
    return {
        "study": roi_study,
        "question": f"By the density categories for mean attenuation on non-contrast CT, which category fits "
        f"{roi_text(centre)}?",
        "choices": options,
        "answer": letter,
        "calls": [
            measure_roi(),
            ToolCall("retrieve", {"query": "lesion density category by mean attenuation in HU"}),
        ],
    }


def build_denser_than_water(study: Study, rng: np.random.Generator) -> dict[str, Any] | None:
    got = _point_case(study, rng, lambda v: 30.0 < abs(v) < 900.0)
    if got is None:
        return None
    roi_study, centre, hu = got
    return {
        "study": roi_study,
        "question": f"Is the tissue in {roi_text(centre)} denser than water, by the definition of the Hounsfield unit?",
        "answer": "yes" if hu > 0 else "no",
        "calls": [measure_roi(), ToolCall("retrieve", {"query": "definition of the Hounsfield unit water"})],
    }


def build_modality(study: Study, rng: np.random.Generator) -> dict[str, Any] | None:
    code = str(study.meta.get("dicom", {}).get("Modality", study.modality)).upper()
    if code not in MODALITY_CHOICES:
        return None
    correct = MODALITY_CHOICES[code]
    options, letter = choice(rng, correct, sorted(set(MODALITY_CHOICES.values())))
    h, w = study.shape2d
    return {
        "question": "Which kind of imaging produced this picture?",
        "choices": options,
        "answer": letter,
        "calls": [ToolCall("zoom", {"boxes": [[0, 0, w, h]]})],
    }


def build_photo_kind(study: Study, rng: np.random.Generator) -> dict[str, Any]:
    correct = study.meta["kind"]
    options = [*PHOTOS.values(), "fluorescence microscopy", "chest radiograph"]
    options, letter = choice(rng, correct, options)
    h, w = study.shape2d
    return {
        "question": "Which kind of image is this?",
        "choices": options,
        "answer": letter,
        "calls": [ToolCall("zoom", {"boxes": [[0, 0, w, h]]})],
    }


# ---------------------------------------------------------------- registry


def _dicom(name: str) -> Callable[[], Study | None]:
    return lambda: dicom_study(name)


# Interleaved by stage and sample, so that a handful of seeds already covers every stage.
SAMPLE_TEMPLATES: dict[str, SampleTemplate] = {
    t.name: t
    for t in (
        SampleTemplate("nuclei_count", "measurement", "numeric", nuclei_study, build_nuclei_count),
        SampleTemplate("brain_tissue_at_point", "recognition", "mc", brain_study, build_tissue_at_point),
        SampleTemplate("ct_window_shade", "visual_reasoning", "mc", _dicom("CT_small.dcm"), build_window_shade),
        SampleTemplate(
            "ct_density_at_point", "medical_reasoning", "mc", _dicom("CT_small.dcm"), build_density_at_point
        ),
        SampleTemplate("brain_volume", "measurement", "numeric", brain_study, _volume("brain", "total brain")),
        SampleTemplate("largest_nucleus_box", "recognition", "box", nuclei_study, build_largest_nucleus_box),
        SampleTemplate("nuclei_above_size", "visual_reasoning", "numeric", nuclei_study, build_nuclei_above),
        SampleTemplate(
            "grey_matter_volume", "measurement", "numeric", brain_study, _volume("grey_matter", "grey-matter")
        ),
        SampleTemplate("mr_modality", "recognition", "mc", _dicom("MR_small.dcm"), build_modality),
        SampleTemplate("brain_largest_slice", "visual_reasoning", "numeric", brain_study, build_largest_slice),
        SampleTemplate("ct_hu_at_point", "measurement", "numeric", _dicom("CT_small.dcm"), build_hu_at_point),
        SampleTemplate("grey_vs_white_matter", "visual_reasoning", "yesno", brain_study, build_grey_vs_white),
        SampleTemplate(
            "ct_denser_than_water", "medical_reasoning", "yesno", _dicom("CT_small.dcm"), build_denser_than_water
        ),
        SampleTemplate("largest_nucleus_area", "measurement", "numeric", nuclei_study, build_largest_nucleus_area),
        SampleTemplate("radiograph_modality", "recognition", "mc", _dicom("RG1_UNCR.dcm"), build_modality),
        SampleTemplate("ultrasound_modality", "recognition", "mc", _dicom("US1_UNCR.dcm"), build_modality),
        SampleTemplate("fundus_photo_kind", "recognition", "mc", lambda: photo_study("retina.jpg"), build_photo_kind),
        SampleTemplate("ihc_slide_kind", "recognition", "mc", lambda: photo_study("ihc.png"), build_photo_kind),
    )
}


def _data_present(t: SampleTemplate) -> bool:
    """Whether a template's files are installed (checked without loading the big ones)."""
    if t.study is nuclei_study:
        return stardist_files() is not None
    if t.study is brain_study:
        return nilearn_files() is not None
    name = t.name
    if name in ("fundus_photo_kind", "ihc_slide_kind"):
        return photo_file("retina.jpg" if name.startswith("fundus") else "ihc.png") is not None
    file = {"radiograph_modality": "RG1_UNCR.dcm", "ultrasound_modality": "US1_UNCR.dcm"}.get(name)
    return dicom_file(file or ("MR_small.dcm" if name.startswith("mr_") else "CT_small.dcm")) is not None


def available_templates() -> list[str]:
    return [name for name, t in SAMPLE_TEMPLATES.items() if _data_present(t)]


class SamplesSource:
    """Cases with expert traces on real images from installed wheels (see module docstring)."""

    name = "samples"

    def __init__(
        self, templates: list[str] | None = None, stages: list[str] | None = None, tool_mode: str = "predicted"
    ):
        from medgym.environments.expert import oracle_only

        unknown = set(templates or []) - set(SAMPLE_TEMPLATES)
        if unknown:
            raise ValueError(f"unknown sample templates {sorted(unknown)}; choose from {sorted(SAMPLE_TEMPLATES)}")
        names = [n for n in available_templates() if templates is None or n in templates]
        if stages:
            names = [n for n in names if SAMPLE_TEMPLATES[n].stage in stages]
        if tool_mode != "oracle":  # questions no honest tool path answers (see medgym.environments.expert)
            names = [n for n in names if not oracle_only(n)]
        self.tool_mode = tool_mode
        if not names:
            raise ValueError(
                "no sample left: install stardist, nilearn or pydicom (their wheels carry the images), "
                "or widen the template / stage filter"
            )
        self.templates = [SAMPLE_TEMPLATES[n] for n in names]

    def __len__(self) -> int:
        return len(self.templates)

    def case(self, seed: int) -> Case:
        template = self.templates[seed % len(self.templates)]
        rng = np.random.default_rng(seed)
        study = template.study()
        if study is None:
            raise ValueError(f"sample {template.name!r}: its data files are missing")
        built = template.build(study, rng)
        if built is None:
            raise ValueError(f"sample {template.name!r} found no suitable question for seed {seed}")
        return make_case(
            self.name, seed, template, built, built.get("study", study), None, f"samples-{template.name}-{seed}"
        )


__all__ = ["SAMPLE_TEMPLATES", "SamplesSource", "available_templates", "brain_study", "nuclei_study", "touching_gap"]
