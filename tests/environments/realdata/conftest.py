"""Small synthetic datasets written by the tests: NIfTI volumes with known lesions, in each layout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SPACING = (0.7, 0.7, 2.5)  # x, y, z in mm, as the NIfTI header stores them
SHAPE = (64, 56, 16)  # x, y, z voxels
SEMI_AXES_MM = (8.0, 5.0, 5.0)  # lesion ellipsoid, x y z
CENTRE_VOX = (20, 30, 8)


def ellipsoid(shape=SHAPE, centre=CENTRE_VOX, semi=SEMI_AXES_MM, spacing=SPACING) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    return sum(((g - c) * s / a) ** 2 for g, c, s, a in zip(grid, centre, spacing, semi, strict=True)) <= 1.0


def volume_with_lesion(seed: int = 0, centre=CENTRE_VOX, semi=SEMI_AXES_MM) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (x, y, z): a 'liver' block at 60 HU holding a 20 HU ellipsoid lesion."""
    rng = np.random.default_rng(seed)
    image = np.full(SHAPE, -100.0) + rng.normal(0, 5, SHAPE)
    labels = np.zeros(SHAPE, np.int16)
    labels[6:50, 10:50, 2:14] = 1
    lesion = ellipsoid(centre=centre, semi=semi)
    labels[lesion] = 2
    image[labels == 1] += 160.0
    image[lesion] = 20.0 + rng.normal(0, 5, int(lesion.sum()))
    return image.astype(np.float32), labels


def save_nifti(path: Path, array: np.ndarray, flip: bool = False) -> None:
    """Write with an RAS affine, or (flip) the same anatomy stored LPS: x and y reversed, negative zooms."""
    affine = np.diag([*SPACING, 1.0])
    if flip:
        array = array[::-1, ::-1, :]
        affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
        affine[0, 3] = SPACING[0] * (SHAPE[0] - 1)
        affine[1, 3] = SPACING[1] * (SHAPE[1] - 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine), str(path))


@pytest.fixture(scope="session")
def msd_dir(tmp_path_factory) -> Path:
    """A two-case Decathlon-style folder (dataset.json, imagesTr/, labelsTr/)."""
    root = tmp_path_factory.mktemp("msd")
    training = []
    for i, flip in enumerate((False, True)):
        image, labels = volume_with_lesion(i)
        save_nifti(root / "imagesTr" / f"liver_{i}.nii.gz", image, flip)
        save_nifti(root / "labelsTr" / f"liver_{i}.nii.gz", labels, flip)
        training.append({"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"})
    meta = {
        "name": "TinyLiver",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="session")
def synth():
    """The helpers above as a fixture (test modules cannot import conftest under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        SPACING=SPACING,
        SHAPE=SHAPE,
        SEMI_AXES_MM=SEMI_AXES_MM,
        CENTRE_VOX=CENTRE_VOX,
        ellipsoid=ellipsoid,
        volume_with_lesion=volume_with_lesion,
        save_nifti=save_nifti,
    )
