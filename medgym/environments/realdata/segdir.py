"""``SegDirSource``: a folder of images with label maps becomes staged questions with expert traces.

Layouts (looked for in this order):

1. Medical Segmentation Decathlon / nnU-Net: ``dataset.json`` with a ``training`` list of
   ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}`` (label names from
   ``labels``, modality from ``modality`` or ``channel_names``); without a ``training``
   list, ``imagesTr/`` and ``labelsTr/`` are paired by name (nnU-Net's ``_0000`` channel
   suffix is understood).
2. ``images/`` and ``labels/`` folders paired by name (a label may add ``_seg`` / ``_label``
   / ``_mask``).
3. A flat folder of ``<name>.nii.gz`` with ``<name>_seg.nii.gz`` (any supported format).

Each case is built by the generic templates of :mod:`medgym.environments.templates`, so
real data and phantoms share questions, answer keys and expert traces. ``case(seed)``
draws the image and the template from one generator seeded by ``seed``. Follow-up
templates get a prior from a real earlier time point (``<case>_t0``, ``<case>_t1`` ...) or
from :func:`~medgym.environments.realdata.longitudinal.synthetic_followup`.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medgym.environments.case import STAGES, Case
from medgym.environments.realdata.loaders import is_image_path, load_study, safe_path, strip_name
from medgym.environments.realdata.longitudinal import (
    FOLLOW_UP_TEMPLATES,
    draw_scale,
    synthetic_followup,
    time_point_pairs,
)
from medgym.environments.templates import Template, make_case, select_templates
from medgym.tools.base import Study

log = logging.getLogger(__name__)

LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_gt")
CT_ONLY = ("mean_attenuation", "density_category")  # they speak of attenuation in HU
PLANE_ONLY = ("lesion_area",)
SIDED = ("lesion_side",)  # "the area on this slice": volumes report it on another slice
ERR_NO_PAIRS = (
    "no image/label pairs found in {root}; use the Decathlon layout (dataset.json, imagesTr/, labelsTr/), "
    "images/ + labels/ folders, or <name>.nii.gz next to <name>_seg.nii.gz"
)


@dataclass(frozen=True)
class Pair:
    """One image with its label map (paths inside the data folder)."""

    name: str
    image: Path
    label: Path | None


@dataclass
class Layout:
    pairs: list[Pair]
    label_names: dict[int, str]
    modality: str | None
    kind: str


def _msd_labels(meta: dict[str, Any]) -> dict[int, str]:
    """MSD writes ``{"0": "background"}``; nnU-Net v2 writes ``{"background": 0}``."""
    raw = meta.get("labels") or {}
    out: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, str) and str(key).isdigit():
            out[int(key)] = value
        elif isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
            out[int(value)] = str(key)
    out.pop(0, None)
    return out


def _msd_modality(meta: dict[str, Any]) -> str | None:
    mods = meta.get("modality") or meta.get("channel_names") or {}
    first = mods.get("0") if isinstance(mods, dict) else None
    if not first:
        return None
    return "MR" if str(first).upper() in ("MRI", "MR", "T1", "T2", "FLAIR", "T1W", "T2W", "ADC") else str(first)


def _key(name: str) -> str:
    name = re.sub(r"_0000$", "", name)  # nnU-Net channel suffix
    for suffix in LABEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _pair_folders(root: Path, images: Path, labels: Path) -> list[Pair]:
    by_key = {_key(strip_name(p)): p for p in sorted(labels.iterdir()) if is_image_path(p)}
    pairs = []
    for image in sorted(images.iterdir()):
        if image.name.startswith(".") or not is_image_path(image):
            continue
        key = _key(strip_name(image))
        if key in by_key:
            pairs.append(Pair(key, safe_path(root, image), safe_path(root, by_key[key])))
    return pairs


def discover(root: str | Path) -> Layout:
    """Find the image/label pairs of a dataset folder (see the module docstring)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise ValueError(f"segdir: {root} is not a folder")
    meta: dict[str, Any] = {}
    if (root / "dataset.json").exists():
        try:
            meta = json.loads((root / "dataset.json").read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"cannot read {root / 'dataset.json'}: {exc}") from exc
        if not isinstance(meta, dict):
            raise ValueError(f"cannot read {root / 'dataset.json'}: expected a JSON object")
    names, modality = _msd_labels(meta), _msd_modality(meta)
    if meta.get("training"):
        pairs = []
        for entry in meta["training"]:
            if not isinstance(entry, dict) or "image" not in entry:
                raise ValueError(f"{root / 'dataset.json'}: each training entry needs 'image' and 'label'")
            image = safe_path(root, entry["image"])
            label = safe_path(root, entry["label"]) if entry.get("label") else None
            pairs.append(Pair(_key(strip_name(image)), image, label))
        return Layout(pairs, names, modality, "msd")
    for images, labels, kind in (("imagesTr", "labelsTr", "msd"), ("images", "labels", "folders")):
        if (root / images).is_dir() and (root / labels).is_dir():
            return Layout(_pair_folders(root, root / images, root / labels), names, modality, kind)
    files = {strip_name(p): p for p in sorted(root.iterdir()) if not p.name.startswith(".") and is_image_path(p)}
    pairs = []
    for stem, path in files.items():
        if _key(stem) != stem:
            continue  # a label file
        label = next((files[stem + s] for s in LABEL_SUFFIXES if stem + s in files), None)
        if label is not None:
            pairs.append(Pair(stem, safe_path(root, path), safe_path(root, label)))
    return Layout(pairs, names, modality, "flat")


def case_id(name: str, seed: int) -> str:
    """A file-name-safe case id."""
    return f"segdir-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{seed}"


def suits(template: Template, study: Study) -> bool:
    """Whether a generic template makes sense on this study at all (build() checks the rest)."""
    if template.name in CT_ONLY and study.modality.upper() != "CT":
        return False
    if template.name in SIDED and study.meta.get("format") == "picture":
        return False  # a PNG/TIFF carries no patient orientation: left and right are unknown
    return not (template.name in PLANE_ONLY and study.is_3d)


class SegDirSource:
    """Cases from a segmentation dataset folder (NIfTI / DICOM / PNG / TIFF with label maps)."""

    name = "segdir"

    def __init__(
        self,
        path: str | Path,
        templates: list[str] | None = None,
        stages: list[str] | None = None,
        cache_size: int = 4,
    ):
        self.root = Path(path).resolve()
        layout = discover(self.root)
        if not layout.pairs:
            raise ValueError(ERR_NO_PAIRS.format(root=self.root))
        chosen = select_templates(templates, stages)
        self.layout = layout
        self.pairs = layout.pairs
        self.by_name = {p.name: p for p in self.pairs}
        self.priors = time_point_pairs(self.by_name)
        self.templates = chosen
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Study] = OrderedDict()

    def study(self, pair: Pair) -> Study:
        """The loaded study of a pair (a small LRU cache: volumes are slow to read)."""
        if pair.name in self._cache:
            self._cache.move_to_end(pair.name)
            return self._cache[pair.name]
        study = load_study(pair.image, pair.label, self.layout.label_names, self.layout.modality, root=self.root)
        study.meta["case_name"] = pair.name
        self._cache[pair.name] = study
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return study

    def _order(self, rng: np.random.Generator) -> list[Template]:
        """Templates in the order to try: a random stage's random template first, then the rest shuffled."""
        stages = [s for s in STAGES if any(t.stage == s for t in self.templates)]
        stage = stages[int(rng.integers(len(stages)))]
        first_pool = [t for t in self.templates if t.stage == stage]
        first = first_pool[int(rng.integers(len(first_pool)))]
        rest = [t for t in self.templates if t is not first]
        return [first] + [rest[i] for i in rng.permutation(len(rest))]

    def _follow_up(self, pair: Pair, study: Study, rng: np.random.Generator) -> tuple[Study, Study] | None:
        """(current, prior): a real earlier time point when there is one, else a synthetic follow-up."""
        if pair.name in self.priors:
            return study, self.study(self.by_name[self.priors[pair.name]])
        if self.priors:
            return None  # a dataset with real time points asks follow-up questions on those only
        if "lesion" not in study.structures or not study.structures["lesion"].any():
            return None
        return synthetic_followup(study, draw_scale(rng)), study

    def case(self, seed: int) -> Case:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.pairs))
        for index in order[: min(len(order), 8)]:
            pair = self.pairs[int(index)]
            study = self.study(pair)
            for template in self._order(rng):
                if not suits(template, study):
                    continue
                current, prior = study, None
                if template.name in FOLLOW_UP_TEMPLATES:
                    got = self._follow_up(pair, study, rng)
                    if got is None:
                        continue
                    current, prior = got
                built = template.build(current, prior, rng)
                if built is None:
                    continue
                return make_case(self.name, seed, template, built, current, prior, case_id(pair.name, seed))
        raise ValueError(f"no template suits the studies tried in {self.root} for seed {seed}")


__all__ = ["Pair", "SegDirSource", "discover", "suits"]
