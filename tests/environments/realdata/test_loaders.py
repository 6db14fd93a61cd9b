"""Loaders: orientation and spacing from headers, DICOM PHI stripping, corrupt files, path escapes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medgym.environments.realdata.loaders import (
    PHI_DICOM_TAGS,
    load_study,
    read_image,
    safe_path,
    strip_phi,
    structure_name,
)
from medgym.tools.measure import mask_metrics


def test_nifti_axes_spacing_and_orientation(tmp_path: Path, synth) -> None:
    SHAPE, SPACING, save_nifti = synth.SHAPE, synth.SPACING, synth.save_nifti
    image, labels = synth.volume_with_lesion(0)
    studies = []
    for flip in (False, True):  # the same anatomy stored RAS and LPS must load identically
        save_nifti(tmp_path / f"img{flip}.nii.gz", image, flip)
        save_nifti(tmp_path / f"lab{flip}.nii.gz", labels, flip)
        studies.append(
            load_study(tmp_path / f"img{flip}.nii.gz", tmp_path / f"lab{flip}.nii.gz", {1: "liver", 2: "tumour"})
        )
    a, b = studies
    assert a.image.shape == (SHAPE[2], SHAPE[1], SHAPE[0])  # (Z, H, W) from (x, y, z)
    assert a.spacing == (SPACING[2], SPACING[1], SPACING[0])
    np.testing.assert_array_equal(a.image, b.image)
    for name in a.structures:
        np.testing.assert_array_equal(a.structures[name], b.structures[name])
    # RAS x index 20 of 64 is towards the patient's left: in the radiological display that is the right half.
    cols = np.nonzero(a.structures["lesion"])[2]
    assert cols.mean() == pytest.approx(SHAPE[0] - 1 - 20)
    assert sorted(a.structures) == ["lesion", "lesion_1", "lesion_tumour", "liver"]
    assert (a.structures["liver"] & a.structures["lesion"]).sum() == a.structures["lesion"].sum()  # the organ holds it
    assert a.display_slice == 8 and a.meta["spacing_source"] == "header"
    # Exact volume and the longest axial diameter within one voxel of the analytic ellipse.
    m = mask_metrics(a.structures["lesion_1"], a.spacing)
    n = int(synth.ellipsoid().sum())
    assert m["volume_ml"] == pytest.approx(n * np.prod(SPACING) / 1000.0, abs=1e-3)
    assert abs(m["longest_diameter_mm"] - 2 * synth.SEMI_AXES_MM[0]) <= SPACING[0]


def _dicom_with_phi(path: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-778899"
    ds.PatientBirthDate = "19610412"
    ds.InstitutionName = "Saint Nowhere Hospital"
    ds.save_as(path)
    return path


PHI_VALUES = ("Doe", "PID-778899", "19610412", "Saint Nowhere")


def test_dicom_phi_never_reaches_meta(tmp_path: Path) -> None:
    path = _dicom_with_phi(tmp_path / "ct.dcm")
    header = pydicom.dcmread(path)
    safe = strip_phi(header)
    assert safe["Modality"] == "CT" and safe["PixelSpacing"] == pytest.approx([0.661468, 0.661468])
    assert not set(PHI_DICOM_TAGS) & set(safe)
    study = load_study(path)
    text = json.dumps(study.meta)
    assert not any(v in text for v in PHI_VALUES), text
    assert study.modality == "CT" and study.spacing == pytest.approx((0.661468, 0.661468))
    # HU: the rescale intercept (-1024) is applied.
    raw = header.pixel_array.astype(float) * float(header.RescaleSlope) + float(header.RescaleIntercept)
    np.testing.assert_allclose(study.image, raw)


def test_dicom_series_folder(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    for i in range(4):
        ds = pydicom.dcmread(_dicom_with_phi(tmp_path / "one.dcm"))
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], 10.0 + 3.0 * i]
        ds.InstanceNumber = i + 1
        ds.PixelData = (ds.pixel_array + 100 * i).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"slice_{3 - i}.dcm")  # file names in reverse order
    study = load_study(folder)
    assert study.image.shape == (4, 128, 128)
    assert study.spacing == pytest.approx((3.0, 0.661468, 0.661468))
    assert np.median(study.image[3] - study.image[0]) == pytest.approx(300.0)  # inferior -> superior
    assert not any(v in json.dumps(study.meta) for v in PHI_VALUES)


def test_picture_spacing_default_and_sidecar(tmp_path: Path) -> None:
    pic = np.zeros((40, 60), np.uint8)
    pic[10:20, 5:25] = 200
    Image.fromarray(pic).save(tmp_path / "a.png")
    Image.fromarray((pic > 0).astype(np.uint8)).save(tmp_path / "a_seg.png")
    study = load_study(tmp_path / "a.png", tmp_path / "a_seg.png")
    assert study.image.shape == (40, 60) and study.spacing == (1.0, 1.0)
    assert "assumed" in study.meta["spacing_source"]
    assert study.structures["label_1"].sum() == 200
    palette = Image.fromarray((pic > 0).astype(np.uint8) * 2, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "a_pal.png")
    assert sorted(load_study(tmp_path / "a.png", tmp_path / "a_pal.png").structures) == ["label_2"]
    (tmp_path / "a.png.json").write_text(json.dumps({"spacing": [0.5, 0.25]}))
    image, spacing, meta = read_image(tmp_path / "a.png")
    assert spacing == (0.5, 0.25) and "sidecar" in meta["spacing_source"]


@pytest.mark.parametrize("name", ["broken.nii.gz", "broken.dcm", "broken.png", "broken.tif"])
def test_corrupt_file_is_a_clear_value_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 this is not an image " * 10)
    with pytest.raises(ValueError, match=r"cannot read .*broken"):
        read_image(path)


def test_paths_stay_inside_the_data_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(outside)
    with pytest.raises(ValueError, match="leaves the data folder"):
        safe_path(root, "../secret.png")
    os.symlink(outside, root / "link.png")
    with pytest.raises(ValueError, match="leaves the data folder"):
        load_study("link.png", root=root)
    with pytest.raises(ValueError, match="does not exist"):
        safe_path(root, "missing.nii.gz")


def test_structure_names() -> None:
    assert structure_name("Liver") == "liver"
    assert structure_name("non-enhancing tumor") == "lesion_non_enhancing_tumor"
    assert structure_name("lesion") == "lesion_label"
    assert structure_name("Lung nodule") == "lesion_lung_nodule"


def test_multichannel_nifti_gives_its_first_channel_and_grids_must_match(tmp_path: Path, synth) -> None:
    import nibabel as nib

    four = np.random.default_rng(0).random((*synth.SHAPE, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(four, np.diag([*synth.SPACING, 1.0])), str(tmp_path / "mc.nii.gz"))
    image, spacing, meta = read_image(tmp_path / "mc.nii.gz")
    np.testing.assert_allclose(image, four[::-1, ::-1, :, 0].transpose(2, 1, 0))
    assert meta["channel"] == "first of 4 channels" and spacing == (2.5, 0.7, 0.7)
    small = np.zeros((8, 8, 4), np.int16)
    nib.save(nib.Nifti1Image(small, np.eye(4)), str(tmp_path / "small.nii.gz"))
    with pytest.raises(ValueError, match="must share one grid"):
        load_study(tmp_path / "mc.nii.gz", tmp_path / "small.nii.gz")
