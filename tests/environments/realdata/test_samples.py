"""The bundled real samples: answers checked against values computed here from the files themselves."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from medgym.cli import main
from medgym.environments.realdata import samples
from medgym.environments.realdata.samples import SamplesSource
from medgym.tools import TOOLS, ToolContext, run_tool

pytestmark = pytest.mark.skipif(
    samples.stardist_files() is None or samples.nilearn_files() is None,
    reason="stardist and nilearn wheels (their bundled images) are needed",
)


def expert_outputs(case) -> list:
    """Run the case's oracle expert calls through the real tools (oracle mode: they name structures)."""
    ctx = ToolContext(study=case.study, prior=case.prior, segmenter="threshold", tool_mode="oracle")
    results = [run_tool(TOOLS, c.name, c.arguments, ctx) for c in case.expert_calls]
    assert not any(r.error for r in results), [r.text for r in results]
    return results


def case_of(template: str):
    source = SamplesSource(templates=[template], tool_mode="oracle")
    return source.case(0)


def test_nuclei_count_matches_the_mask_file() -> None:
    _, mask_path = samples.stardist_files()
    instances = tifffile.imread(str(mask_path))
    ids = np.unique(instances[instances > 0])
    # Independent count: label ids, each one connected piece (scipy.ndimage.label, 8-connected).
    assert all(ndimage.label(instances == i, structure=np.ones((3, 3)))[1] == 1 for i in ids)
    case = case_of("nuclei_count")
    assert int(case.answer) == len(ids)
    (segment,) = expert_outputs(case)
    assert len(segment.data["components"]) == len(ids) and f"{len(ids)} component(s)" in segment.text
    # Touching nuclei stay apart in the union (a plain label of the foreground merges them).
    assert ndimage.label(instances > 0, structure=np.ones((3, 3)))[1] < len(ids)


def _mni(name: str) -> tuple[np.ndarray, float]:
    img = nib.load(str(samples.nilearn_files()[name]))
    data = np.asarray(img.dataobj, dtype=np.float32)
    return data / data.max(), float(np.prod(img.header.get_zooms()[:3]))


def test_brain_and_grey_matter_volumes_match_nibabel() -> None:
    t1, t1_voxel_mm3 = _mni("t1")
    gm, gm_voxel_mm3 = _mni("gm")
    brain_ml = int((t1 > 0.2).sum()) * t1_voxel_mm3 / 1000.0  # nilearn's load_mni152_brain_mask rule
    gm_ml = int(ndimage.binary_closing(gm > 0.2, iterations=2).sum()) * gm_voxel_mm3 / 1000.0  # its gm_mask rule
    for template, truth in (("brain_volume", brain_ml), ("grey_matter_volume", gm_ml)):
        case = case_of(template)
        assert float(case.answer) == pytest.approx(truth, abs=0.05)
        (segment,) = expert_outputs(case)
        assert segment.data["volume_ml"] == pytest.approx(truth, abs=0.01)
        assert f"volume {truth:.2f} mL" in segment.text
    assert 1000 < brain_ml < 2500 and gm_ml < brain_ml


def test_tissue_point_and_ct_roi_traces_hold_the_answer() -> None:
    case = case_of("brain_tissue_at_point")
    (measure,) = expert_outputs(case)
    in_grey = measure.data["edge_distance_mm"] == 0.0
    assert case.choices[ord(case.answer) - 65] == ("grey matter" if in_grey else "white matter")
    ct = case_of("ct_hu_at_point")
    (roi,) = expert_outputs(ct)
    assert roi.data["mean_intensity"] == pytest.approx(float(ct.answer), abs=0.05)
    assert "CompressedSamples" not in json.dumps(ct.study.meta)  # CT_small.dcm's PatientName
    assert ct.study.meta["dicom"]["Modality"] == "CT"


@pytest.mark.parametrize("mode", ["oracle", "predicted"])
def test_cli_eval_samples_expert(tmp_path: Path, capsys, mode: str) -> None:
    n = len(SamplesSource(tool_mode=mode))
    assert main(["eval", "--source", "samples", "--policy", "expert", "--json", "--n", str(n), "--tool-mode", mode,
                 "--segmenter", "threshold", "--out", str(tmp_path)]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == n and summary["tool_mode"] == mode
    assert set(summary["by_stage"]) == {"recognition", "measurement", "visual_reasoning", "medical_reasoning"}
    assert summary["tool_errors"] == 0 and summary["tool_calls"] >= n
    if mode == "oracle":
        assert summary["accuracy"] == 1.0
    else:  # oracle-only questions are left out; the rest are answered from real segmentations
        assert n < len(SamplesSource(tool_mode="oracle")) and summary["accuracy"] >= 0.8
    assert (tmp_path / "traces.jsonl").exists()


def test_predicted_samples_measure_the_named_region_as_a_box() -> None:
    """The roi a question names is measured as a box in predicted mode: the same number as the oracle's roi."""
    from medgym.environments.expert import expert_calls

    ct = case_of("ct_hu_at_point")
    calls = expert_calls(ct, "predicted")
    assert [c.name for c in calls] == ["measure"] and "box" in calls[0].arguments
    ctx = ToolContext(study=ct.study, segmenter="threshold")
    got = run_tool(TOOLS, "measure", calls[0].arguments, ctx)
    assert not got.error and got.data["mean_intensity"] == pytest.approx(float(ct.answer), abs=0.05)


@pytest.mark.slow
def test_medsam_on_the_samples_nuclei_reaches_dice() -> None:
    """LiteMedSAM from GT boxes on the samples source's nuclei (the tools test does the same on the raw files)."""
    study = samples.nuclei_study()
    ctx = ToolContext(study=study, segmenter="medsam", tool_mode="oracle")
    dices = []
    for k in range(1, 9):
        truth = study.structures[f"nucleus_{k}"]
        ys, xs = np.nonzero(truth)
        box = [xs.min() - 3.0, ys.min() - 3.0, xs.max() + 4.0, ys.max() + 4.0]
        result = run_tool(TOOLS, "segment", {"box": box}, ctx)
        mask = ctx.masks[result.data["mask_id"]]
        dices.append(2.0 * (mask & truth).sum() / (mask.sum() + truth.sum()))
    assert np.mean(dices) >= 0.85, dices
