"""Task sources: seeded producers of cases. ``PhantomSource`` draws procedural phantoms.

Seeding happens here, in one place: ``case(seed)`` makes one generator from the seed
and every random choice of that case (template, study kind, anatomy, lesions, noise,
choice order) is drawn from it, so a seed names a case.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from medgym.environments.case import STAGES, Case
from medgym.environments.phantom import (
    DENSITY_HU,
    ORGAN_HU,
    Difficulty,
    PhantomPlan,
    add_distractors,
    add_lesion,
    anatomy,
    render,
    with_lesion_scale,
)
from medgym.environments.realdata.samples import SamplesSource
from medgym.environments.realdata.segdir import SegDirSource
from medgym.environments.realdata.vqa import VQASource
from medgym.environments.templates import Request, Template, make_case, select_templates

LESION_ORGANS = {
    "ct2d": ("liver", "spleen", "kidney_right", "kidney_left"),
    "ct3d": ("liver", "spleen", "kidney_right", "kidney_left"),
    "chest_ct": ("lung_right", "lung_left"),
    "xray": ("lung_right", "lung_left"),
}


class TaskSource(Protocol):
    name: str

    def case(self, seed: int) -> Case: ...


def lesion_value(
    rng: np.random.Generator, kind: str, organ: str, density: str | None, min_contrast: float = 25.0
) -> float:
    """A lesion intensity of the density class that stands out from its host organ."""
    if kind == "xray":
        return float(rng.uniform(0.18, 0.35))
    host = ORGAN_HU.get(organ, 40.0)
    classes = [density] if density else ["fluid", "soft tissue", "soft tissue", "fat"]
    for _ in range(100):
        lo, hi = DENSITY_HU[str(rng.choice(classes))]
        value = float(rng.uniform(lo, hi))
        if abs(value - host) >= min_contrast:
            return value
    return float(DENSITY_HU[classes[0]][0] if host > 0 else DENSITY_HU[classes[0]][1])


class PhantomSource:
    """Procedural phantom cases: CT slices and volumes, chest CT, X-ray projections."""

    name = "phantom"

    def __init__(
        self,
        size: int = 256,
        templates: list[str] | None = None,
        stages: list[str] | None = None,
        difficulty: str | dict | Difficulty = "standard",
    ):
        chosen = select_templates(templates, stages)
        self.size = size
        self.difficulty = Difficulty.named(difficulty)
        self.by_stage = {s: [t for t in chosen if t.stage == s] for s in STAGES}
        self.by_stage = {s: ts for s, ts in self.by_stage.items() if ts}

    def _place(self, rng: np.random.Generator, plan: PhantomPlan, req: Request) -> bool:
        used: set[str] = set()
        for spec in req.lesions:
            pool = [spec.organ] if spec.organ else list(LESION_ORGANS[plan.kind])
            if req.distinct_organs:
                pool = [o for o in pool if o not in used]
            rng.shuffle(pool)
            diameter = float(rng.uniform(*spec.diameter))
            for organ in pool:
                value = lesion_value(rng, plan.kind, organ, spec.density, self.difficulty.min_contrast_hu)
                if add_lesion(rng, plan, organ, diameter, value):
                    used.add(organ)
                    break
            else:
                return False
        return True

    def case(self, seed: int) -> Case:
        rng = np.random.default_rng(seed)
        sorted(self.by_stage)
        template = self._pick(rng, sorted(self.by_stage))
        for _ in range(60):
            kind = str(rng.choice(template.kinds))
            plan = anatomy(rng, kind, self.size)
            plan.noise *= self.difficulty.noise
            plan.blur_mm = self.difficulty.blur_mm
            # Distractors from their own stream, so the standard level draws the cases it always did.
            add_distractors(np.random.default_rng([seed, 31]), plan, self.difficulty.distractors)
            req = template.request(rng, kind)
            if not self._place(rng, plan, req):
                continue
            current_plan = plan if req.prior_scale is None else with_lesion_scale(plan, {"lesion_1": req.prior_scale})
            study = render(current_plan, int(rng.integers(2**31)))
            prior = None if req.prior_scale is None else render(plan, int(rng.integers(2**31)))
            for s in (study, prior):
                if s is not None:
                    s.meta["difficulty"] = self.difficulty.as_dict()
            built = template.build(study, prior, rng)
            if built is None:
                continue
            return make_case(self.name, seed, template, built, study, prior, f"phantom-{seed}")
        raise RuntimeError(f"template {template.name!r} found no suitable phantom for seed {seed}")

    def _pick(self, rng: np.random.Generator, stages: list[str]) -> Template:
        stage = stages[int(rng.integers(len(stages)))]
        pool = self.by_stage[stage]
        return pool[int(rng.integers(len(pool)))]


class CaseRange(Sequence[Case]):
    """Cases ``first .. first + count - 1`` of a source, made when indexed (nothing held in memory).

    >>> cases = CaseRange(PhantomSource(), 1000, 3)
    >>> len(cases), cases[2].seed
    (3, 1002)
    """

    def __init__(self, source: TaskSource, first: int, count: int) -> None:
        self.source, self.first, self.count = source, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if not -self.count <= i < self.count:
            raise IndexError(f"case index {i} outside 0..{self.count - 1}")
        return self.source.case(self.first + i % self.count)


SOURCES = {"phantom": PhantomSource, "segdir": SegDirSource, "vqa": VQASource, "samples": SamplesSource}
PATH_SOURCES = ("segdir", "vqa")  # these take the part after ``name:`` as their data folder


def make_source(spec: str, **kwargs: object) -> TaskSource:
    """A source from its CLI name (``phantom``, ``samples``, ``segdir:PATH``, ``vqa:PATH``);
    keyword arguments go to its constructor. ``tool_mode`` reaches the sources that take it (those
    with oracle-only questions leave them out in predicted mode) and is dropped for the others."""
    name, _, arg = spec.partition(":")
    if name not in SOURCES:
        raise ValueError(f"unknown source {spec!r}; choose one of: {', '.join(sorted(SOURCES))}")
    if "tool_mode" in kwargs and "tool_mode" not in inspect.signature(SOURCES[name]).parameters:
        kwargs.pop("tool_mode")
    if name in PATH_SOURCES:
        if not arg:
            raise ValueError(f"source {name!r} needs a data folder: write {name}:PATH")
        return SOURCES[name](arg, **kwargs)  # type: ignore[arg-type]
    if arg:
        raise ValueError(f"source {name!r} takes no path; write just {name!r}")
    return SOURCES[name](**kwargs)  # type: ignore[arg-type]


__all__ = ["SOURCES", "PhantomSource", "SamplesSource", "SegDirSource", "TaskSource", "VQASource", "make_source"]
