"""The expert in each tool mode: the calls it makes and the answer it gives.

In **oracle** mode the expert names ground-truth structures (the case's recorded
``expert_calls``) and gives the known answer: an upper bound.

In **predicted** mode it works as an annotator at a workstation would. Before segmenting a lesion
it runs ``detect`` (the automatic candidate list, from the pixels alone) and, where a listed
candidate fits the lesion it sees about as tightly as its own box would, names that candidate;
where none does, it draws its own: the ground-truth box widened by 1-3 pixels per side, drawn from the case's seed — ground
truth used *as an annotator's eye* (to judge candidates, to draw boxes), never handed to a tool.
Then it segments with the real segmenter, measures the predicted masks, and computes its answer
from the numbers the tools printed. Ground truth only scores that answer, so segmentation error
shows up as wrong answers.

Questions whose answer no honest tool path reaches here are *oracle-only*
(:data:`ORACLE_ONLY_TEMPLATES`): sources leave them out in predicted mode. Real-data questions
about a region the question itself names (a 3 x 3 ``roi`` at a given row and column) measure
that region as a box, so their answer follows from the printed numbers exactly as in oracle mode.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from medgym.environments.case import Case, ToolCall, box_text
from medgym.environments.rewards import box_iou
from medgym.environments.runner import MAX_CALLS_PER_TURN
from medgym.environments.templates import (
    TEMPLATES,
    density_category,
    fmt,
    lesions,
    nodule_category,
    response_category,
    size_class,
    zoom_on,
)
from medgym.tools.base import Study, mask_box
from medgym.tools.detect import DetectArgs, candidates

# Real-data questions with no honest predicted-mode path: counting or volumes of many-component or
# whole-organ structures need an automatic segmenter (none ships offline), and tissue-at-point needs
# a grey-matter segmentation. They remain in oracle mode.
ORACLE_ONLY_TEMPLATES = frozenset(
    {
        "nuclei_count",
        "nuclei_above_size",
        "brain_volume",
        "grey_matter_volume",
        "brain_largest_slice",
        "grey_vs_white_matter",
        "brain_tissue_at_point",
    }
)
RETRIEVE_QUERIES = {
    "nodule_follow_up": "follow-up of a solid pulmonary nodule by size",
    "response_category": "tumour response category from change in longest diameter",
    "density_category": "lesion density category by mean attenuation in HU",
    "liver_size_class": "liver lesion size classes small intermediate large",
}
MEASURE_KEYS = {
    "longest_diameter": ("longest_diameter_mm", 1),
    "lesion_area": ("area_mm2", 1),
    "lesion_volume": ("volume_ml", 2),
    "mean_attenuation": ("mean_intensity", 1),
    "largest_nucleus_area": ("area_mm2", 1),
}
FOLLOW_UP = ("lesion_grown", "percent_change", "response_category")
DETECT_LISTED = DetectArgs.model_fields["max_candidates"].default  # what a plain detect call lists
# A candidate is the lesion's prompt when its box holds the lesion's centre and fits it about as tightly as
# the annotator's own box would (a looser one segments more than the lesion: measurements drift).
CANDIDATE_MIN_IOU = 0.65
Record = dict[str, Any]


def oracle_only(template: str) -> bool:
    """Whether a template has no honest predicted-mode path (see :data:`ORACLE_ONLY_TEMPLATES`)."""
    return template in ORACLE_ONLY_TEMPLATES


def annotator_box(study: Study, mask: np.ndarray, rng: np.random.Generator) -> tuple[list[int], int | None]:
    """The annotator's prompt for a mask: its box on its largest slice, widened by 1-3 px per side."""
    z = int(np.argmax(mask.sum(axis=(1, 2)))) if mask.ndim == 3 else None
    box = mask_box(mask[z] if z is not None else mask)
    if box is None:
        raise ValueError("annotator_box needs a non-empty mask")
    h, w = study.shape2d
    m = rng.integers(1, 4, size=4)
    x0, y0, x1, y1 = (int(v) for v in box)
    return [max(0, x0 - int(m[0])), max(0, y0 - int(m[1])), min(w, x1 + int(m[2])), min(h, y1 + int(m[3]))], z


def _holds(candidate: list[int], seen: list[int], min_iou: float = CANDIDATE_MIN_IOU) -> bool:
    """Whether a candidate's box is the lesion's: it holds the lesion box's centre and overlaps it by ``min_iou``."""
    cx, cy = (seen[0] + seen[2]) / 2, (seen[1] + seen[3]) / 2
    inside = candidate[0] <= cx <= candidate[2] and candidate[1] <= cy <= candidate[3]
    return inside and box_iou(candidate, seen) >= min_iou


class _Plan:
    """The predicted-mode calls of one case, with the mask ids they will get (segment numbers them in order)."""

    def __init__(self, case: Case, candidate_iou: float = CANDIDATE_MIN_IOU):
        self.case = case
        self.candidate_iou = candidate_iou
        self.rng = np.random.default_rng([int(case.seed or 0), 7919])
        self.calls: list[ToolCall] = []
        self.n_masks = 0
        self.listed: dict[str, list[dict[str, Any]]] = {}
        self.used: set[tuple[str, int]] = set()

    def detect(self, study: Study, which: str = "current") -> list[dict[str, Any]]:
        """Call detect once per study; the candidates it will list (the tool computes the same)."""
        if which not in self.listed:
            self.calls.append(ToolCall("detect", {} if which == "current" else {"study": which}))
            self.listed[which] = candidates(study.image, study.modality)[:DETECT_LISTED]
        return self.listed[which]

    def candidate(self, study: Study, mask: np.ndarray, which: str) -> tuple[int, int | None] | None:
        """The number and slice of the first listed candidate that is this lesion (box overlap on its slice), if any."""
        for i, c in enumerate(self.detect(study, which)):
            z = c["slice_index"]
            plane = mask if z is None else mask[z]
            seen = mask_box(plane) if plane.any() else None
            if (which, i) not in self.used and seen is not None and _holds(c["box"], seen, self.candidate_iou):
                self.used.add((which, i))
                return i + 1, z
        return None

    def segment(self, study: Study, mask: np.ndarray, which: str = "current", lesion: bool = False) -> str:
        """Segment one object: a lesion by its detect candidate's number when one is listed, else the annotator's box."""
        found = self.candidate(study, mask, which) if lesion else None
        if found is not None:
            args: dict[str, Any] = {"candidate": found[0]}
            z = found[1]
        else:
            box, z = annotator_box(study, mask, self.rng)
            args = {"box": box}
            if z is not None:
                args["slice_index"] = z  # a candidate carries its own slice
        if z is not None:
            args["propagate"] = True  # the whole lesion in 3D, carried slice to slice from the prompt
        if which != "current":
            args["study"] = which
        self.calls.append(ToolCall("segment", args))
        self.n_masks += 1
        return f"mask_{self.n_masks}"

    def measure(self, mask_id: str, which: str = "current", **extra: Any) -> None:
        args: dict[str, Any] = {"target": mask_id, **extra}
        if which != "current":
            args["study"] = which
        self.calls.append(ToolCall("measure", args))

    def segment_choices(self, study: Study) -> list[tuple[str, str]]:
        """Segment each organ offered as a choice that the picture shows: (choice text, mask id)."""
        out = []
        for text in self.case.choices:
            name = text.replace(" ", "_")
            if name in study.structures and study.structures[name].any():
                out.append((text, self.segment(study, study.structures[name])))
        return out


def _roi_box(study: Study) -> list[int] | None:
    """The box of a question's named region (a 3 x 3 ``roi`` at the row and column the question gives)."""
    roi = study.structures.get("roi")
    if roi is None or not roi.any():
        return None
    return [int(v) for v in mask_box(roi if roi.ndim == 2 else roi.any(axis=0))]


def expert_calls(case: Case, mode: str = "predicted", candidate_iou: float | None = None) -> list[ToolCall]:
    """The expert's calls for a tool mode (oracle: the case's recorded calls).

    ``candidate_iou``: how tightly a listed detect candidate must fit the lesion for the expert to
    segment it by number rather than draw its own box (0.2 names nearly every listed lesion; None,
    :data:`CANDIDATE_MIN_IOU`, draws a box wherever the candidate's would measure worse).
    """
    if mode == "oracle" or case.source == "vqa":
        return list(case.expert_calls)
    plan = _Plan(case, CANDIDATE_MIN_IOU if candidate_iou is None else candidate_iou)
    study, t = case.study, case.template
    found = lesions(study)
    if t in FOLLOW_UP and case.prior is not None:
        before = lesions(case.prior)
        if before:
            plan.measure(plan.segment(case.prior, before[0], "prior", lesion=True), "prior")
        if found:
            plan.measure(plan.segment(study, found[0], lesion=True))
    elif t in ("lesion_present", "lesion_count"):
        plan.detect(study)  # the candidate list, even when nothing is there to segment
        for m in found:
            plan.segment(study, m, lesion=True)
    elif t in ("count_above_size", "larger_lesion_organ"):
        ids = [plan.segment(study, m, lesion=True) for m in found]
        for mid in ids:
            plan.measure(mid)
        if t == "larger_lesion_organ":
            for _, oid in plan.segment_choices(study):
                for mid in ids:
                    plan.measure(mid, to=oid)
    elif t == "nodule_follow_up" and found:
        if study.modality.upper() == "CT":
            plan.calls.append(ToolCall("window", {"preset": "lung"}))
        plan.measure(plan.segment(study, found[0], lesion=True), component=1)
    elif t == "lesion_organ" and found:
        mid = plan.segment(study, found[0], lesion=True)
        for _, oid in plan.segment_choices(study):
            plan.measure(mid, to=oid)
    elif t == "lesion_box" and found:
        plan.segment(study, found[0], lesion=True)
        box, _ = annotator_box(study, found[0], np.random.default_rng([int(case.seed or 0), 7919]))
        plan.calls.append(zoom_on(study, [float(v) for v in box]))
    elif t == "lesion_side" and found:
        plan.segment(study, found[0], lesion=True)
    elif (t in MEASURE_KEYS or t in ("density_category", "liver_size_class")) and found:
        plan.measure(plan.segment(study, found[0], lesion=True), component=1)
    elif t in ("largest_nucleus_area", "largest_nucleus_box") and "nuclei" in study.structures:
        from medgym.tools.measure import components

        mid = plan.segment(study, components(study.structures["nuclei"])[0])
        if t == "largest_nucleus_area":
            plan.measure(mid, component=1)
    elif _roi_box(study) is not None:
        # The question names the region: measure it as a box; other calls (a window) as recorded.
        for call in case.expert_calls:
            if call.name == "measure":
                plan.calls.append(ToolCall("measure", {"box": _roi_box(study)}))
            elif "structure" not in call.arguments:
                plan.calls.append(call)
    else:
        # Questions about the whole picture (modality, kind of photograph): the recorded looks, none by name.
        plan.calls += [c for c in case.expert_calls if "structure" not in c.arguments and "target" not in c.arguments]
    if t in RETRIEVE_QUERIES:
        plan.calls.append(ToolCall("retrieve", {"query": RETRIEVE_QUERIES[t]}))
    return plan.calls


def expert_turns(case: Case, mode: str = "predicted") -> list[str]:
    """The expert's tool turns as model text. Oracle: one call a turn, as recorded. Predicted: consecutive
    calls of one tool share a turn (all segments, then all measures), so a long plan fits the step budget."""
    calls = expert_calls(case, mode)
    if mode == "oracle":
        return [c.as_text() for c in calls]
    turns: list[list[ToolCall]] = []
    for call in calls:
        if turns and turns[-1][0].name == call.name and len(turns[-1]) < MAX_CALLS_PER_TURN:
            turns[-1].append(call)
        else:
            turns.append([call])
    return ["".join(c.as_text() for c in turn) for turn in turns]


# ---------------------------------------------------------------- answers from printed numbers


def _ok(records: list[Record], name: str) -> list[Record]:
    return [r for r in records if r.get("name") == name and not r.get("error")]


def _args(r: Record) -> dict[str, Any]:
    a = r.get("arguments")
    return a if isinstance(a, dict) else {}


def _data(r: Record) -> dict[str, Any]:
    return r.get("data") or {}


def _measures(records: list[Record], which: str = "current") -> list[dict[str, Any]]:
    """Measurements of single masks (no distance) on a study, in call order."""
    return [
        _data(r)
        for r in _ok(records, "measure")
        if not _args(r).get("to") and _args(r).get("study", "current") == which
    ]


def _segments(records: list[Record], which: str = "current") -> list[dict[str, Any]]:
    return [_data(r) for r in _ok(records, "segment") if _args(r).get("study", "current") == which]


def _nearest(records: list[Record], mask_id: str, organ_ids: list[str]) -> str | None:
    """The organ mask nearest a lesion mask: edge distance first, then centroid distance."""
    best: tuple[float, float, str] | None = None
    for r in _ok(records, "measure"):
        a, d = _args(r), _data(r)
        if a.get("target") == mask_id and a.get("to") in organ_ids:
            key = (float(d.get("edge_distance_mm", 1e9)), float(d.get("centroid_distance_mm", 1e9)), a["to"])
            best = key if best is None or key < best else best
    return None if best is None else best[2]


def _organ_choice(case: Case, records: list[Record], mask_id: str, n_lesions: int) -> str | None:
    """The choice naming the organ nearest ``mask_id``. Organ masks follow the lesions', in choice order."""
    offered = [c for c in case.choices if c.replace(" ", "_") in case.study.structures]
    offered = [c for c in offered if case.study.structures[c.replace(" ", "_")].any()]
    organ_ids = [f"mask_{n_lesions + 1 + i}" for i in range(len(offered))]
    organ = _nearest(records, mask_id, organ_ids)
    return None if organ is None else offered[organ_ids.index(organ)]


def _letter(case: Case, text: str | None) -> str:
    return chr(65 + case.choices.index(text)) if text in case.choices else "A"


def blank_answer(answer_type: str) -> str:
    """What is answered with nothing to go on: "no", "0", or the first choice.

    >>> [blank_answer(t) for t in ("yesno", "numeric", "mc")]
    ['no', '0', 'A']
    """
    return {"yesno": "no", "numeric": "0"}.get(answer_type, "A")


def expert_answer(case: Case, mode: str, records: list[Record]) -> str:
    """The expert's final turn: in predicted mode computed from the tool results it read, in oracle mode the known one.

    ``records`` are the tool results in call order: ``{"name", "arguments", "text", "data", "error"}``.
    """
    if mode == "oracle" or case.source == "vqa":
        return case.expert_answer
    t, study = case.template, case.study
    segs, meas = _segments(records), _measures(records)
    box = segs[0].get("box") if segs else None
    text: str | None = None
    if t == "lesion_present":
        text = "yes" if segs else "no"
    elif t == "lesion_count":
        text = str(len(segs))
    elif t == "lesion_side" and box is not None:
        cx = (box[0] + box[2]) / 2
        text = _letter(case, "the patient's right" if cx < (study.shape2d[1] - 1) / 2 else "the patient's left")
    elif t in ("lesion_box", "largest_nucleus_box") and box is not None:
        return f"<answer>{box_text(box)}</answer><box>{box_text(box)}</box>"
    elif t == "lesion_organ" and segs:
        text = _letter(case, _organ_choice(case, records, segs[0]["mask_id"], 1))
    elif t in MEASURE_KEYS and meas and MEASURE_KEYS[t][0] in meas[0]:
        key, digits = MEASURE_KEYS[t]
        text = fmt(float(meas[0][key]), digits)
    elif t == "count_above_size":
        m = re.search(r"at least ([\d.]+) mm", case.question)
        threshold = float(m.group(1)) if m else 0.0
        text = str(sum(float(d.get("longest_diameter_mm", 0.0)) >= threshold for d in meas))
    elif t == "larger_lesion_organ" and meas:
        sizes = [float(d.get("longest_diameter_mm", 0.0)) for d in meas]
        bigger = str(meas[int(np.argmax(sizes))].get("target"))
        text = _letter(case, _organ_choice(case, records, bigger, len(meas)))
    elif t in FOLLOW_UP:
        prior = _measures(records, "prior")
        d0 = float(prior[0]["longest_diameter_mm"]) if prior else 0.0
        d1 = float(meas[0]["longest_diameter_mm"]) if meas else 0.0
        if t == "lesion_grown":
            text = "yes" if d1 > d0 else "no"
        elif t == "percent_change":
            text = fmt(100.0 * (d1 - d0) / d0 if d0 else 0.0, 1)
        else:
            text = _letter(case, response_category(d0, d1) if d0 else "stable disease")
    elif t in ("nodule_follow_up", "density_category", "liver_size_class") and meas:
        d = meas[0]
        if t == "nodule_follow_up":
            text = _letter(case, nodule_category(float(d["longest_diameter_mm"])))
        elif t == "density_category":
            text = _letter(case, density_category(float(d.get("mean_intensity", 0.0))))
        else:
            text = _letter(case, size_class(float(d["longest_diameter_mm"])))
    elif t not in TEMPLATES and t not in MEASURE_KEYS and t != "largest_nucleus_box":
        # Real-data questions on a region the question names, or on the whole picture (modality,
        # kind of photograph): the printed numbers (a box's mean intensity) give the recorded answer,
        # which tests/environments/realdata check against them.
        return case.expert_answer
    if text is None:
        # Nothing segmented where the question needs a finding: say so (scored as any answer is).
        text = blank_answer(case.answer_type)
    answer = f"<answer>{text}</answer>"
    if box is not None and case.answer_box is not None:
        answer += f"<box>{box_text([float(v) for v in box])}</box>"
    return answer
