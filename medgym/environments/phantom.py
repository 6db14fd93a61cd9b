"""Procedural phantoms: CT-like slices and volumes and X-ray-like projections with exact masks.

Every study is drawn from a ``numpy.random.Generator``; the same seed gives the same
pixels. Geometry is planned in millimetres and rasterised with the drawn pixel spacing,
so physical answers do not depend on the resolution. The radiological convention holds:
the patient's right is on the image's left.

A :class:`PhantomPlan` is the list of objects to draw; :func:`render` turns it into a
:class:`~medgym.tools.base.Study`. A prior study re-renders the same plan with the
lesions changed (``scale``), so follow-up questions have a known change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from medgym.tools.base import Study

# Mean intensity of each lesion density class, HU; kept well inside the class bounds
# of the knowledge base (fat < -10, fluid -10..20, soft tissue 20..100, calcified > 100).
DENSITY_HU = {"fat": (-90.0, -40.0), "fluid": (0.0, 10.0), "soft tissue": (40.0, 80.0), "calcified": (140.0, 250.0)}

ORGAN_HU = {
    "liver": 60.0,
    "spleen": 48.0,
    "kidney_right": 32.0,
    "kidney_left": 32.0,
    "lung_right": -850.0,
    "lung_left": -850.0,
}


@dataclass
class Blob:
    """An ellipse (or ellipsoid in 3D) with a wobbly outline, in mm from the image centre."""

    name: str
    cy: float
    cx: float
    ry: float
    rx: float
    value: float
    angle: float = 0.0
    wobble: tuple[float, ...] = ()
    cz: float = 0.0
    rz: float = 0.0
    scale: float = 1.0  # lesion size factor on a follow-up study


@dataclass
class PhantomPlan:
    kind: str  # "ct2d", "ct3d", "chest_ct", "xray"
    size: int
    spacing: tuple[float, ...]
    organs: list[Blob]
    lesions: list[Blob] = field(default_factory=list)
    noise: float = 8.0
    n_slices: int = 1
    blur_mm: float = 0.0  # Gaussian blur before noise: partial volume at edges (Difficulty.blur_mm)


@dataclass(frozen=True)
class Difficulty:
    """How hard a phantom is to read, so that segmenting from a prompt is not trivially exact.

    ``standard`` is the default rendering; ``hard`` and ``harder`` add noise, partial-volume blur,
    lower lesion contrast and unlabelled distractor blobs (small vessel-like discs of lesion-like
    intensity that no question counts). Recorded in each study's ``meta["difficulty"]``.
    """

    noise: float = 1.0  # multiplier on the noise standard deviation
    blur_mm: float = 0.0  # partial-volume blur (Gaussian sigma, mm) before noise
    min_contrast_hu: float = 25.0  # a CT lesion differs from its host organ by at least this
    distractors: int = 0  # unlabelled small discs per image

    @classmethod
    def named(cls, level: str | dict | Difficulty) -> Difficulty:
        if isinstance(level, Difficulty):
            return level
        if isinstance(level, dict):
            return cls(**level)
        if level not in DIFFICULTY_LEVELS:
            raise ValueError(f"unknown difficulty {level!r}; choose one of: {', '.join(DIFFICULTY_LEVELS)}")
        return DIFFICULTY_LEVELS[level]

    def as_dict(self) -> dict[str, float]:
        return {
            "noise": self.noise,
            "blur_mm": self.blur_mm,
            "min_contrast_hu": self.min_contrast_hu,
            "distractors": self.distractors,
        }


DIFFICULTY_LEVELS: dict[str, Difficulty] = {
    "standard": Difficulty(),
    "hard": Difficulty(noise=2.5, blur_mm=0.8, min_contrast_hu=20.0, distractors=3),
    "harder": Difficulty(noise=4.0, blur_mm=1.5, min_contrast_hu=15.0, distractors=6),
}


def add_distractors(rng: np.random.Generator, plan: PhantomPlan, n: int) -> None:
    """Small unlabelled discs (vessel cross-sections) inside organs; lesions drawn later cover them."""
    hosts = [o for o in plan.organs if not o.name.startswith("_") and o.name != "body"]
    for k in range(n if hosts else 0):
        host = hosts[int(rng.integers(len(hosts)))]
        r = float(rng.uniform(2.0, 4.0))
        t, rho = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.6))
        value = float(rng.uniform(0.2, 0.3)) if plan.kind == "xray" else float(host.value + rng.choice([-1, 1]) * 60.0)
        blob = Blob(
            f"_distractor_{k}",
            float(host.cy + rho * host.ry * np.sin(t)),
            float(host.cx + rho * host.rx * np.cos(t)),
            r,
            r,
            value,
        )
        if plan.kind == "ct3d":
            blob.rz = float(r * 2)
        plan.organs.append(blob)


def _blob_mask(b: Blob, yy: np.ndarray, xx: np.ndarray, zz: np.ndarray | None = None) -> np.ndarray:
    """Mask of a blob; only the blob's bounding region is evaluated (volumes are large)."""
    out = np.zeros(yy.shape, dtype=bool)
    s = b.scale
    if s <= 0:
        return out
    reach = max(b.ry, b.rx) * s * (1.0 + sum(abs(a) for a in b.wobble)) + 1.0
    ys, xs = yy[(0,) * (yy.ndim - 2) + (slice(None), 0)], xx[(0,) * (xx.ndim - 1)]
    iy = np.nonzero(np.abs(ys - b.cy) <= reach)[0]
    ix = np.nonzero(np.abs(xs - b.cx) <= reach)[0]
    if len(iy) == 0 or len(ix) == 0:
        return out
    region = (..., slice(iy[0], iy[-1] + 1), slice(ix[0], ix[-1] + 1))
    out[region] = _blob_inside(b, yy[region], xx[region], None if zz is None else zz[region])
    return out


def _blob_inside(b: Blob, yy: np.ndarray, xx: np.ndarray, zz: np.ndarray | None) -> np.ndarray:
    s = b.scale
    dy, dx = yy - b.cy, xx - b.cx
    ca, sa = np.cos(b.angle), np.sin(b.angle)
    u, v = (ca * dx + sa * dy) / (b.rx * s), (-sa * dx + ca * dy) / (b.ry * s)
    r2 = u**2 + v**2
    if zz is not None and b.rz > 0:
        r2 = r2 + ((zz - b.cz) / (b.rz * s)) ** 2
    if b.wobble:
        theta = np.arctan2(v, u)
        edge = 1.0 + sum(a * np.cos((k + 2) * theta + k) for k, a in enumerate(b.wobble))
        return r2 <= edge**2
    return r2 <= 1.0


def render(plan: PhantomPlan, seed: int) -> Study:
    """Rasterise a plan into a Study with masks for body, organs, each lesion and their union."""
    rng = np.random.default_rng(seed)
    n, sp = plan.size, plan.spacing
    sy, sx = sp[-2], sp[-1]
    ys = (np.arange(n) - (n - 1) / 2) * sy
    xs = (np.arange(n) - (n - 1) / 2) * sx
    if plan.kind == "ct3d":
        sz = sp[0]
        zs = (np.arange(plan.n_slices) - (plan.n_slices - 1) / 2) * sz
        zz, yy, xx = np.meshgrid(zs, ys, xs, indexing="ij")
    else:
        zz = None
        yy, xx = np.meshgrid(ys, xs, indexing="ij")

    xray = plan.kind == "xray"
    image = np.full(yy.shape, 0.0 if xray else -1000.0, dtype=np.float32)
    structures: dict[str, np.ndarray] = {}
    for organ in plan.organs:
        m = _blob_mask(organ, yy, xx, zz)
        if xray:
            image[m] += organ.value  # a projection sums attenuation
        else:
            image[m] = organ.value
        if not organ.name.startswith("_"):
            structures[organ.name] = m
    union = np.zeros(yy.shape, dtype=bool)
    for les in plan.lesions:
        m = _blob_mask(les, yy, xx, zz)
        if xray:
            image[m] += les.value
        else:
            image[m] = les.value
        structures[les.name] = m
        union |= m
    structures["lesion"] = union
    image = ndimage.gaussian_filter(image, 0.6) if xray else image
    if plan.blur_mm > 0:
        image = ndimage.gaussian_filter(image, [plan.blur_mm / v for v in sp[-image.ndim :]])
    image = image + rng.normal(0.0, plan.noise, size=image.shape).astype(np.float32)
    display = None
    if plan.kind == "ct3d":
        area = union.sum(axis=(1, 2))
        display = int(np.argmax(area)) if area.any() else plan.n_slices // 2
    modality = "XR" if xray else "CT"
    return Study(
        image=image.astype(np.float32),
        spacing=tuple(float(s) for s in sp),
        modality=modality,
        structures=structures,
        display_slice=display,
        meta={"kind": plan.kind, "phantom": True},
    )


def _wobble(rng: np.random.Generator, amount: float = 0.08) -> tuple[float, ...]:
    return tuple(float(a) for a in rng.uniform(-amount, amount, size=3))


def anatomy(rng: np.random.Generator, kind: str, size: int) -> PhantomPlan:
    """Body and organs for one study kind, in mm."""
    if kind == "xray":
        spacing: tuple[float, ...] = (float(rng.uniform(1.2, 1.6)),) * 2
    else:
        spacing = (float(rng.uniform(0.65, 0.95)),) * 2
    fov = size * spacing[-1]
    bw, bh = fov * rng.uniform(0.40, 0.45), fov * rng.uniform(0.30, 0.36)
    organs: list[Blob] = []
    if kind == "xray":
        organs.append(Blob("body", 0, 0, bh * 1.2, bw, 0.45))
        for side, sign in (("right", -1), ("left", 1)):
            organs.append(Blob(f"lung_{side}", -bh * 0.1, sign * bw * 0.45, bh * 0.85, bw * 0.38, -0.3))
        organs.append(Blob("_mediastinum", 0, 0, bh * 0.8, bw * 0.16, 0.25))
        return PhantomPlan(kind, size, spacing, organs, noise=0.015)
    organs.append(Blob("body", 0, 0, bh, bw, 30.0, wobble=_wobble(rng, 0.03)))
    if kind == "chest_ct":
        for side, sign in (("right", -1), ("left", 1)):
            organs.append(
                Blob(
                    f"lung_{side}", -bh * 0.05, sign * bw * 0.47, bh * 0.75, bw * 0.4, -850.0, wobble=_wobble(rng, 0.04)
                )
            )
        organs.append(Blob("_heart", bh * 0.05, bw * 0.08, bh * 0.35, bw * 0.25, 40.0))
        organs.append(Blob("_spine", bh * 0.7, 0, bh * 0.16, bh * 0.16, 700.0))
        plan = PhantomPlan(kind, size, spacing, organs)
    else:
        organs += [
            Blob(
                "liver",
                -bh * 0.15,
                -bw * 0.42,
                bh * 0.62,
                bw * 0.42,
                ORGAN_HU["liver"],
                angle=0.2,
                wobble=_wobble(rng, 0.04),
            ),
            Blob(
                "spleen",
                -bh * 0.1,
                bw * 0.58,
                bh * 0.4,
                bw * 0.22,
                ORGAN_HU["spleen"],
                angle=-0.4,
                wobble=_wobble(rng, 0.04),
            ),
            Blob("kidney_right", bh * 0.45, -bw * 0.3, bh * 0.28, bw * 0.14, ORGAN_HU["kidney_right"], angle=0.3),
            Blob("kidney_left", bh * 0.45, bw * 0.3, bh * 0.28, bw * 0.14, ORGAN_HU["kidney_left"], angle=-0.3),
            Blob("_spine", bh * 0.62, 0, bh * 0.15, bh * 0.15, 700.0),
            Blob("_aorta", bh * 0.35, 0, bh * 0.07, bh * 0.07, 45.0),
        ]
        plan = PhantomPlan(kind, size, spacing, organs)
    if kind == "ct3d":
        plan.n_slices = int(rng.integers(14, 22))
        plan.spacing = (float(rng.choice([2.5, 3.0, 4.0, 5.0])), *spacing)
        depth = plan.n_slices * plan.spacing[0]
        for o in plan.organs:
            o.rz = depth * (2.0 if o.name in ("body", "_spine", "_aorta") else 0.4)
    return plan


def add_lesion(
    rng: np.random.Generator,
    plan: PhantomPlan,
    organ: str,
    diameter_mm: float,
    value: float,
    tries: int = 200,
) -> Blob | None:
    """Place a lesion of about this diameter fully inside an organ, clear of other lesions."""
    host = next(o for o in plan.organs if o.name == organ)
    r = diameter_mm / 2
    for _ in range(tries):
        aspect = rng.uniform(0.7, 1.0)
        ry, rx = r * aspect, r
        # inside the host ellipse with a margin of the lesion's radius (plus wobble room)
        t, rho = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 1))
        margin = r * 1.25 + 3.0
        if host.ry - margin <= 0 or host.rx - margin <= 0:
            return None
        ly = host.cy + rho * (host.ry - margin) * np.sin(t) * 0.85
        lx = host.cx + rho * (host.rx - margin) * np.cos(t) * 0.85
        clear = all(np.hypot(ly - o.cy, lx - o.cx) > (max(o.ry, o.rx) * 1.15 + r * 1.15 + 4.0) for o in plan.lesions)
        if not clear:
            continue
        blob = Blob(
            name=f"lesion_{len(plan.lesions) + 1}",
            cy=float(ly),
            cx=float(lx),
            ry=float(ry),
            rx=float(rx),
            value=float(value),
            angle=float(rng.uniform(0, np.pi)),
            wobble=_wobble(rng, 0.06),
        )
        if plan.kind == "ct3d":
            blob.cz = float(rng.uniform(-0.25, 0.25) * plan.n_slices * plan.spacing[0])
            blob.rz = float(max(r * rng.uniform(0.8, 1.2), plan.spacing[0] * 1.5))
        plan.lesions.append(blob)
        return blob
    return None


def with_lesion_scale(plan: PhantomPlan, scales: dict[str, float]) -> PhantomPlan:
    """The same plan with lesions resized (0 removes one): the other time point of a follow-up."""
    return replace(plan, lesions=[replace(b, scale=scales.get(b.name, 1.0)) for b in plan.lesions])
