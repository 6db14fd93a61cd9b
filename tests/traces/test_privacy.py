"""Cases loaded from DICOM never carry patient-identifying tags into traces, image names or reports.

A CT slice and its label map are written as DICOM files with patient name, id, birth
date (and institution, physician, accession number) set; the segmentation-folder
source loads them through the DICOM loader, episodes run with ``record_to``, a report
is written, and none of those values may appear anywhere in what was written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medgym.cli import main

PHI = {
    "PatientName": "Zyzzyva^Quorra",
    "PatientID": "PID-93847561",
    "PatientBirthDate": "19510302",
    "InstitutionName": "Saint Elsewhere Clinic",
    "ReferringPhysicianName": "Quackenbush^Hugo",
    "AccessionNumber": "ACC77120455",
}
# Whole values and their parts (names split at "^"; the birth date also in ISO form); distinctive
# enough that no question or tool text contains them by chance.
NEEDLES = [
    *PHI.values(),
    "Zyzzyva",
    "Quorra",
    "93847561",
    "1951-03-02",
    "Elsewhere",
    "Quackenbush",
]


def _loader_available() -> bool:
    try:
        from medgym.environments.realdata import loaders  # noqa: F401
        from medgym.environments.realdata.segdir import SegDirSource  # noqa: F401
    except ImportError:
        return False
    return True


def write_dicom(path: Path, pixels: np.ndarray, spacing: tuple[float, float] = (0.8, 0.8)) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = list(spacing)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = pixels.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_dataset(root: Path) -> Path:
    """An MSD-style folder: one CT slice (body, liver, one tumour) and its label map, both DICOM."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:192, :192]
    body = ((yy - 96) / 80) ** 2 + ((xx - 96) / 90) ** 2 <= 1
    liver = ((yy - 90) / 40) ** 2 + ((xx - 70) / 45) ** 2 <= 1
    tumour = (yy - 85) ** 2 + (xx - 65) ** 2 <= 11**2
    image = np.full((192, 192), -1000.0)
    image[body] = 30
    image[liver] = 60
    image[tumour] = 10
    image += rng.normal(0, 4, image.shape)
    labels = np.zeros((192, 192), np.int16)
    labels[liver] = 1
    labels[tumour] = 2
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    write_dicom(root / "imagesTr" / "ct1.dcm", image)
    write_dicom(root / "labelsTr" / "ct1.dcm", labels)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "liver", "2": "tumour"},
                "modality": {"0": "CT"},
                "training": [{"image": "./imagesTr/ct1.dcm", "label": "./labelsTr/ct1.dcm"}],
            }
        )
    )
    return root


@pytest.mark.skipif(not _loader_available(), reason="DICOM loader not yet available")
def test_no_patient_identifiers_in_traces_images_or_reports(tmp_path):
    import pydicom

    from medgym.environments.evaluate import evaluate
    from medgym.environments.policies import ExpertPolicy

    data = write_dataset(tmp_path / "data")
    raw = pydicom.dcmread(data / "imagesTr" / "ct1.dcm")
    assert str(raw.PatientName) == PHI["PatientName"]  # the identifiers really are in the input

    out = tmp_path / "run"
    summary = evaluate(ExpertPolicy(), source=f"segdir:{data}", n=4, seed=0, out=out, segmenter="threshold")
    traces = out / "traces.jsonl"
    assert summary["n"] == 4 and summary["accuracy"] == 1.0
    report = tmp_path / "report.html"
    assert main(["report", str(traces), "--out", str(report)]) == 0
    sft = tmp_path / "sft"
    assert main(["export-sft", str(traces), "--out", str(sft)]) == 0

    texts = {"traces": traces.read_text(), "report": report.read_text()}
    texts["image names"] = "\n".join(p.name for p in (out / "images").iterdir())
    texts["sft files"] = "\n".join(p.read_bytes().decode("latin-1") for p in sft.rglob("*") if p.is_file())
    for where, text in texts.items():
        for needle in NEEDLES:
            assert needle.lower() not in text.lower(), f"{needle!r} leaked into the {where}"
    # The episodes are real DICOM episodes: the trace names the source and the CT modality.
    first = json.loads(traces.read_text().splitlines()[0])["header"]
    assert first["source"] == "segdir" and "CT image" in first["question"]

    # ...and they replay from the data folder alone.
    assert main(["replay", str(traces), "--verify"]) == 0
