"""Question templates in four stages, each with its verifiable answer and expert trace.

A template's ``build(study, prior, rng)`` works on any study with labelled masks
(``lesion_1``, ``lesion_2`` ... or a ``lesion`` union, organ masks, a ``body`` mask)
and its spacing, so real segmentation data reuses the same questions; it returns None
when the study does not suit it (e.g. two lesions too close in size to rank). Its
``request(rng, kind)`` says what a phantom must draw for it.

Ground truth comes from :func:`medgym.tools.measure.mask_metrics` on the exact masks —
the very function the ``measure`` tool reports - so the answer key and the tools share
one convention. The rules of the medical-reasoning stage are those of the knowledge
base (``tools/knowledge/passages.jsonl``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from medgym.environments.case import AnswerType, Case, Stage, ToolCall, box_text
from medgym.tools.base import Study, mask_box, organ_names
from medgym.tools.base import organ_of as base_organ_of
from medgym.tools.measure import components, mask_metrics

NODULE_CATEGORIES = ("no routine follow-up", "CT at 6-12 months", "CT at 3 months, PET/CT or tissue sampling")
RESPONSE_CATEGORIES = ("complete response", "partial response", "stable disease", "progressive disease")
DENSITY_CATEGORIES = ("fat", "fluid", "soft tissue", "calcified")
SIZE_CLASSES = ("small", "intermediate", "large")


# ---------------------------------------------------------------- study helpers


def lesion_union(study: Study) -> np.ndarray:
    if "lesion" in study.structures:
        return study.structures["lesion"]
    masks = [m for n, m in study.structures.items() if n.startswith("lesion_")]
    return np.logical_or.reduce(masks) if masks else np.zeros(study.image.shape, dtype=bool)


def lesions(study: Study) -> list[np.ndarray]:
    """Lesion instances, largest first (the order segment and measure report)."""
    return components(lesion_union(study))


def organs(study: Study) -> list[str]:
    return [n for n in organ_names(study.structures) if study.structures[n].any()]


def organ_of(study: Study, mask: np.ndarray) -> str | None:
    return base_organ_of(mask, study.structures)


def plane_box(study: Study, mask: np.ndarray) -> list[float] | None:
    """The lesion's box on the displayed plane (the picture the model sees)."""
    m2 = mask[study.display_slice] if mask.ndim == 3 else mask
    box = mask_box(m2)
    return None if box is None else [float(v) for v in box]


def metrics(study: Study, mask: np.ndarray) -> dict[str, Any]:
    return mask_metrics(mask, study.spacing, study.image)


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def pretty(name: str) -> str:
    return name.replace("_", " ")


def segment_lesions() -> ToolCall:
    return ToolCall("segment", {"structure": "lesion"})


def zoom_on(study: Study, box: list[float], margin: int = 8) -> ToolCall:
    """A look at a box with some context around it, clipped to the image."""
    h, w = study.shape2d
    padded = [max(0, box[0] - margin), max(0, box[1] - margin), min(w, box[2] + margin), min(h, box[3] + margin)]
    return ToolCall("zoom", {"boxes": [[int(v) for v in padded]]})


def measure_largest() -> ToolCall:
    return ToolCall("measure", {"target": "mask_1", "component": 1})


def choice(rng: np.random.Generator, correct: str, options: list[str]) -> tuple[list[str], str]:
    """Shuffle options; return them and the letter of the correct one."""
    order = [options[i] for i in rng.permutation(len(options))]
    return order, chr(65 + order.index(correct))


def multiple_choice(
    rng: np.random.Generator,
    question: str,
    correct: str,
    options: list[str],
    calls: list[ToolCall],
    box: list[float] | None = None,
) -> dict[str, Any]:
    """A multiple-choice build result: options shuffled, the answer their letter."""
    shuffled, letter = choice(rng, correct, options)
    return {"question": question, "choices": shuffled, "answer": letter, "answer_box": box, "calls": calls}


def far_from(value: float, bounds: tuple[float, ...], margin: float) -> bool:
    return all(abs(value - b) > margin for b in bounds)


# ---------------------------------------------------------------- phantom requests


@dataclass
class LesionSpec:
    organ: str | None  # None: any organ of the kind
    diameter: tuple[float, float]  # mm range
    density: str | None = None  # a DENSITY_CATEGORIES name, or None for any visible one


@dataclass
class Request:
    lesions: list[LesionSpec] = field(default_factory=list)
    prior_scale: float | None = None  # lesion_1 size on the current study relative to the prior
    distinct_organs: bool = False


def _n_lesions(rng: np.random.Generator, lo: int, hi: int, diameter=(6.0, 25.0)) -> Request:
    return Request([LesionSpec(None, diameter) for _ in range(int(rng.integers(lo, hi + 1)))])


def _one(rng: np.random.Generator, kind: str) -> Request:
    return Request([LesionSpec(None, (8.0, 30.0))])


# ---------------------------------------------------------------- templates


@dataclass(frozen=True)
class Template:
    name: str
    stage: Stage
    answer_type: AnswerType
    kinds: tuple[str, ...]
    request: Callable[[np.random.Generator, str], Request]
    build: Callable[[Study, Study | None, np.random.Generator], dict[str, Any] | None]


def _single(study: Study) -> np.ndarray | None:
    found = lesions(study)
    return found[0] if len(found) == 1 else None


def build_present(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any]:
    return {
        "question": "Is there a focal lesion in this image?",
        "answer": "yes" if lesion_union(study).any() else "no",
        "calls": [segment_lesions()],
    }


def build_organ(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any] | None:
    les = _single(study)
    names = organs(study)
    if les is None or len(names) < 2:
        return None
    host = organ_of(study, les)
    if host is None:
        return None
    others = [n for n in names if n != host]
    picked = [others[i] for i in rng.permutation(len(others))[:3]]
    return multiple_choice(
        rng,
        "In which organ is the lesion?",
        pretty(host),
        [pretty(host)] + [pretty(o) for o in picked],
        [segment_lesions()],
        box=plane_box(study, les),
    )


def build_side(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any] | None:
    les = _single(study)
    if les is None:
        return None
    ref = study.structures.get("body")
    width = study.image.shape[-1]
    mid = np.nonzero(ref)[-1].mean() if ref is not None and ref.any() else (width - 1) / 2
    cx = np.nonzero(les)[-1].mean()
    if abs(cx - mid) < 0.05 * width:
        return None
    # Radiological convention: the patient's right is on the image's left.
    side = "the patient's right" if cx < mid else "the patient's left"
    return multiple_choice(
        rng,
        "On which side of the patient is the lesion?",
        side,
        ["the patient's right", "the patient's left"],
        [segment_lesions()],
        box=plane_box(study, les),
    )


def build_locate(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any] | None:
    les = _single(study)
    box = None if les is None else plane_box(study, les)
    if box is None:
        return None
    return {
        "question": "Where is the lesion? Give its bounding box.",
        "answer": box_text(box),
        "answer_box": box,
        "calls": [segment_lesions(), zoom_on(study, box)],
    }


def _largest(study: Study) -> tuple[np.ndarray, dict[str, Any]] | None:
    found = lesions(study)
    if not found:
        return None
    if len(found) > 1 and found[0].sum() < 1.2 * found[1].sum():
        return None  # "the largest" must be plain to see
    return found[0], metrics(study, found[0])


def _numeric_measure(key: str, question: str, unit: str, digits: int, rel: float, abs_tol: Callable[[Study], float]):
    def build(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any] | None:
        got = _largest(study)
        if got is None or key not in got[1]:
            return None
        mask, m = got
        return {
            "question": question,
            "answer": fmt(m[key], digits),
            "unit": unit,
            "tolerance": rel,
            "abs_tolerance": abs_tol(study),
            "answer_box": plane_box(study, mask),
            "calls": [segment_lesions(), measure_largest()],
        }

    return build


def _pixel(study: Study) -> float:
    return max(study.spacing2d)


build_diameter = _numeric_measure(
    "longest_diameter_mm", "What is the longest axial diameter of the largest lesion?", "mm", 1, 0.05, _pixel
)
build_area = _numeric_measure(
    "area_mm2", "What is the area of the largest lesion on this slice?", "mm2", 1, 0.05, lambda s: 2 * _pixel(s) ** 2
)
build_volume = _numeric_measure("volume_ml", "What is the volume of the largest lesion?", "mL", 2, 0.05, lambda s: 0.05)
build_mean_hu = _numeric_measure(
    "mean_intensity", "What is the mean attenuation of the largest lesion?", "HU", 1, 0.0, lambda s: 5.0
)


def build_count(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any]:
    return {
        "question": "How many focal lesions are there?",
        "answer": str(len(lesions(study))),
        "calls": [segment_lesions()],
    }


def build_larger_organ(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any] | None:
    found = lesions(study)
    if len(found) != 2:
        return None
    hosts = [organ_of(study, m) for m in found]
    if None in hosts or hosts[0] == hosts[1]:
        return None
    d = [metrics(study, m)["longest_diameter_mm"] for m in found]
    if max(d) < 1.15 * min(d):
        return None
    bigger = hosts[int(np.argmax(d))]
    return multiple_choice(
        rng,
        "Two organs contain a lesion. Which organ holds the lesion with the longer diameter?",
        pretty(bigger),
        [pretty(h) for h in hosts],  # type: ignore[arg-type]
        [segment_lesions(), ToolCall("measure", {"target": "mask_1"})],
    )


def build_count_above(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any] | None:
    found = lesions(study)
    if len(found) < 2:
        return None
    d = [metrics(study, m)["longest_diameter_mm"] for m in found]
    candidates = [t for t in (5.0, 8.0, 10.0, 15.0, 20.0) if far_from(t, tuple(d), 1.5) and min(d) < t <= max(d)]
    if not candidates:
        return None
    threshold = float(rng.choice(candidates))
    return {
        "question": f"How many lesions have a longest diameter of at least {threshold:g} mm?",
        "answer": str(sum(v >= threshold for v in d)),
        "calls": [segment_lesions(), ToolCall("measure", {"target": "mask_1"})],
    }


def _change(study: Study, prior: Study | None) -> tuple[float, float] | None:
    """(prior, current) longest diameter of the single lesion; current 0 when it is gone."""
    if prior is None:
        return None
    before = _single(prior)
    if before is None:
        return None
    now = lesions(study)
    if len(now) > 1:
        return None
    d0 = metrics(prior, before)["longest_diameter_mm"]
    d1 = metrics(study, now[0])["longest_diameter_mm"] if now else 0.0
    return d0, d1


def _follow_up_calls(gone: bool) -> list[ToolCall]:
    calls = [ToolCall("measure", {"target": "lesion", "study": "prior"}), segment_lesions()]
    if not gone:
        calls.append(measure_largest())
    return calls


def build_grown(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any] | None:
    ch = _change(study, prior)
    if ch is None or ch[1] == 0 or abs(ch[1] - ch[0]) < 0.1 * ch[0]:
        return None
    return {
        "question": "Compare with the prior study. Has the lesion grown?",
        "answer": "yes" if ch[1] > ch[0] else "no",
        "calls": _follow_up_calls(False),
    }


def build_percent_change(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any] | None:
    ch = _change(study, prior)
    if ch is None or ch[1] == 0:
        return None
    pct = 100.0 * (ch[1] - ch[0]) / ch[0]
    return {
        "question": "By what percentage has the lesion's longest diameter changed since the prior study "
        "(negative for shrinkage)?",
        "answer": fmt(pct, 1),
        "unit": "%",
        "tolerance": 0.0,
        "abs_tolerance": 3.0,
        "calls": _follow_up_calls(False),
    }


def nodule_category(d: float) -> str:
    if d < 6.0:
        return NODULE_CATEGORIES[0]
    return NODULE_CATEGORIES[1] if d <= 8.0 else NODULE_CATEGORIES[2]


def build_followup(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any] | None:
    les = _single(study)
    if les is None or not (organ_of(study, les) or "").startswith("lung"):
        return None
    d = metrics(study, les)["longest_diameter_mm"]
    if not far_from(d, (6.0, 8.0), 0.3):
        return None
    return multiple_choice(
        rng,
        "A solitary solid pulmonary nodule is seen in a low-risk patient. Which follow-up does the "
        "size rule recommend?",
        nodule_category(d),
        list(NODULE_CATEGORIES),
        [
            *([ToolCall("window", {"preset": "lung"})] if study.modality.upper() == "CT" else []),
            segment_lesions(),
            measure_largest(),
            ToolCall("retrieve", {"query": "follow-up of a solid pulmonary nodule by size"}),
        ],
        box=plane_box(study, les),
    )


def response_category(d0: float, d1: float) -> str:
    if d1 == 0:
        return "complete response"
    change = (d1 - d0) / d0
    if change <= -0.30:
        return "partial response"
    if change >= 0.20 and d1 - d0 >= 5.0:
        return "progressive disease"
    return "stable disease"


def build_response(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any] | None:
    ch = _change(study, prior)
    if ch is None:
        return None
    d0, d1 = ch
    if d1 > 0 and not far_from((d1 - d0) / d0, (-0.30, 0.20), 0.03):
        return None
    if d1 > 0 and abs(d1 - d0 - 5.0) < 0.5:
        return None
    category = response_category(d0, d1)
    calls = _follow_up_calls(d1 == 0)
    calls.append(ToolCall("retrieve", {"query": "tumour response category from change in longest diameter"}))
    return multiple_choice(
        rng,
        "The lesion is a target lesion followed for treatment response. Compared with the prior "
        "study, what is the response category?",
        category,
        list(RESPONSE_CATEGORIES),
        calls,
    )


def density_category(hu: float) -> str:
    if hu < -10:
        return "fat"
    if hu <= 20:
        return "fluid"
    return "soft tissue" if hu <= 100 else "calcified"


def build_density(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any] | None:
    les = _single(study)
    if les is None or study.modality.upper() != "CT":
        return None
    hu = metrics(study, les)["mean_intensity"]
    if not far_from(hu, (-10.0, 20.0, 100.0), 3.0):
        return None
    return multiple_choice(
        rng,
        "On this non-contrast CT, which density category does the lesion belong to?",
        density_category(hu),
        list(DENSITY_CATEGORIES),
        [
            segment_lesions(),
            measure_largest(),
            ToolCall("retrieve", {"query": "lesion density category by mean attenuation in HU"}),
        ],
        box=plane_box(study, les),
    )


def size_class(d: float) -> str:
    if d < 10.0:
        return "small"
    return "intermediate" if d <= 20.0 else "large"


def build_size_class(study: Study, prior: Study | None, rng: np.random.Generator) -> dict[str, Any] | None:
    les = _single(study)
    if les is None or organ_of(study, les) != "liver":
        return None
    d = metrics(study, les)["longest_diameter_mm"]
    if not far_from(d, (10.0, 20.0), 0.5):
        return None
    return multiple_choice(
        rng,
        "Using the project's liver lesion size classes, how is this liver lesion classed?",
        size_class(d),
        list(SIZE_CLASSES),
        [
            segment_lesions(),
            measure_largest(),
            ToolCall("retrieve", {"query": "liver lesion size classes small intermediate large"}),
        ],
        box=plane_box(study, les),
    )


class TemplateInfo(Protocol):
    name: str
    stage: Stage
    answer_type: AnswerType


def make_case(
    source: str,
    seed: int,
    template: TemplateInfo,
    built: dict[str, Any],
    study: Study,
    prior: Study | None,
    case_id: str,
) -> Case:
    """A Case from a template's ``build`` output; every task source assembles its cases here."""
    return Case(
        case_id=case_id,
        source=source,
        seed=seed,
        stage=template.stage,
        template=template.name,
        question=built["question"],
        answer_type=template.answer_type,
        answer=built["answer"],
        study=study,
        prior=prior,
        choices=built.get("choices", []),
        tolerance=built.get("tolerance", 0.0),
        abs_tolerance=built.get("abs_tolerance", 0.0),
        answer_box=built.get("answer_box"),
        unit=built.get("unit", ""),
        expert_calls=list(built["calls"]),
    )


# ---------------------------------------------------------------- requests per template


def _maybe_none(rng: np.random.Generator, kind: str) -> Request:
    return _n_lesions(rng, 0, 1) if rng.random() < 0.5 else Request()


def _count(rng: np.random.Generator, kind: str) -> Request:
    return _n_lesions(rng, 0, 4)


def _several(rng: np.random.Generator, kind: str) -> Request:
    return _n_lesions(rng, 2, 4, (4.0, 26.0))


def _two_organs(rng: np.random.Generator, kind: str) -> Request:
    return Request([LesionSpec(None, (6.0, 14.0)), LesionSpec(None, (15.0, 28.0))], distinct_organs=True)


def _followed(rng: np.random.Generator, kind: str) -> Request:
    scale = float(rng.choice([0.0, rng.uniform(0.4, 0.62), rng.uniform(0.85, 1.12), rng.uniform(1.35, 1.7)]))
    return Request([LesionSpec(None, (12.0, 28.0))], prior_scale=scale)


def _followed_present(rng: np.random.Generator, kind: str) -> Request:
    req = _followed(rng, kind)
    req.prior_scale = req.prior_scale or 1.4
    return req


def _nodule(rng: np.random.Generator, kind: str) -> Request:
    band = [(3.5, 5.3), (6.5, 7.6), (9.0, 16.0)][int(rng.integers(3))]
    return Request([LesionSpec(None, band, "soft tissue")])


def _dense(rng: np.random.Generator, kind: str) -> Request:
    return Request([LesionSpec(None, (10.0, 25.0), str(rng.choice(DENSITY_CATEGORIES)))])


def _liver_sized(rng: np.random.Generator, kind: str) -> Request:
    band = [(5.0, 9.0), (11.5, 18.5), (22.0, 34.0)][int(rng.integers(3))]
    return Request([LesionSpec("liver", band)])


ABDOMEN, CHEST = ("ct2d", "ct3d"), ("chest_ct", "xray")

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "lesion_present", "recognition", "yesno", ("ct2d", "chest_ct", "xray", "ct3d"), _maybe_none, build_present
        ),
        Template("lesion_organ", "recognition", "mc", ("ct2d", "ct3d", "chest_ct"), _one, build_organ),
        Template("lesion_side", "recognition", "mc", ("ct2d", "chest_ct", "xray"), _one, build_side),
        Template("lesion_box", "recognition", "box", ("ct2d", "chest_ct", "xray"), _one, build_locate),
        Template(
            "longest_diameter", "measurement", "numeric", ("ct2d", "chest_ct", "xray", "ct3d"), _one, build_diameter
        ),
        Template("lesion_area", "measurement", "numeric", ("ct2d", "chest_ct"), _one, build_area),
        Template("lesion_volume", "measurement", "numeric", ("ct3d",), _one, build_volume),
        Template("mean_attenuation", "measurement", "numeric", ("ct2d", "ct3d"), _one, build_mean_hu),
        Template("lesion_count", "measurement", "numeric", ("ct2d", "chest_ct", "xray", "ct3d"), _count, build_count),
        Template("larger_lesion_organ", "visual_reasoning", "mc", ("ct2d",), _two_organs, build_larger_organ),
        Template(
            "count_above_size", "visual_reasoning", "numeric", ("ct2d", "chest_ct", "xray"), _several, build_count_above
        ),
        Template("lesion_grown", "visual_reasoning", "yesno", ("ct2d", "chest_ct"), _followed_present, build_grown),
        Template(
            "percent_change",
            "visual_reasoning",
            "numeric",
            ("ct2d", "chest_ct"),
            _followed_present,
            build_percent_change,
        ),
        Template("nodule_follow_up", "medical_reasoning", "mc", CHEST, _nodule, build_followup),
        Template("response_category", "medical_reasoning", "mc", ("ct2d", "chest_ct"), _followed, build_response),
        Template("density_category", "medical_reasoning", "mc", ("ct2d",), _dense, build_density),
        Template("liver_size_class", "medical_reasoning", "mc", ABDOMEN, _liver_sized, build_size_class),
    )
}


def select_templates(templates: list[str] | None = None, stages: list[str] | None = None) -> list[Template]:
    """Templates by name and stage (all when both are None); a clear error for none or unknown names."""
    unknown = set(templates or []) - set(TEMPLATES)
    if unknown:
        raise ValueError(f"unknown templates {sorted(unknown)}; choose from {sorted(TEMPLATES)}")
    chosen = [TEMPLATES[t] for t in (templates or TEMPLATES)]
    if stages:
        chosen = [t for t in chosen if t.stage in stages]
    if not chosen:
        raise ValueError("no template left after filtering by stage")
    return chosen
