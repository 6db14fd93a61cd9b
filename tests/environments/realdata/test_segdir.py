"""SegDirSource: layouts, analytic round trip of the answers, follow-ups, and the CLI on a segdir."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgym.cli import main
from medgym.environments.policies import ExpertPolicy
from medgym.environments.realdata.longitudinal import synthetic_followup
from medgym.environments.realdata.segdir import SegDirSource, discover
from medgym.environments.sources import make_source
from medgym.tools.measure import mask_metrics


def run_expert(case, tool_mode: str = "oracle") -> dict:
    """One episode of the expert in the env on this very case; the final info."""
    import gymnasium as gym

    from medgym.environments import ENV_ID
    from medgym.environments.evaluate import run_episode

    env = gym.make(ENV_ID, source=make_source("phantom"), segmenter="threshold", tool_mode=tool_mode)
    ep = run_episode(env, ExpertPolicy(tool_mode=tool_mode), 0, case=case)
    env.close()
    assert ep["tool_errors"] == 0
    return ep["info"]


def test_round_trip_volume_and_diameter(msd_dir: Path, synth) -> None:
    n_voxels = int(synth.ellipsoid().sum())
    voxel_ml = float(np.prod(synth.SPACING)) / 1000.0
    volume = SegDirSource(msd_dir, templates=["lesion_volume"]).case(0)
    assert float(volume.answer) == pytest.approx(round(n_voxels * voxel_ml, 2), abs=1e-9)
    assert volume.study.spacing == (2.5, 0.7, 0.7)
    diameter = SegDirSource(msd_dir, templates=["longest_diameter"]).case(1)
    assert abs(float(diameter.answer) - 2 * synth.SEMI_AXES_MM[0]) <= synth.SPACING[0]
    # The display slice is the lesion's largest slice, and the expert's tools give the same numbers.
    assert volume.study.display_slice == synth.CENTRE_VOX[2]
    for case in (volume, diameter):
        info = run_expert(case)
        assert info["correct"] and info["tool_calls_ok"] == 2


def test_layouts_are_discovered(tmp_path: Path, synth) -> None:
    image, labels = synth.volume_with_lesion(3)
    flat = tmp_path / "flat"
    synth.save_nifti(flat / "a.nii.gz", image)
    synth.save_nifti(flat / "a_seg.nii.gz", labels)
    synth.save_nifti(flat / "lonely.nii.gz", image)  # no label: ignored
    layout = discover(flat)
    assert [(p.name, p.image.name, p.label.name) for p in layout.pairs] == [("a", "a.nii.gz", "a_seg.nii.gz")]
    folders = tmp_path / "folders"
    (folders / "images").mkdir(parents=True)
    (folders / "labels").mkdir()
    pic = np.zeros((64, 64), np.uint8)
    pic[20:40, 10:30] = 180
    Image.fromarray(pic).save(folders / "images" / "x.png")
    Image.fromarray((pic > 0).astype(np.uint8)).save(folders / "labels" / "x_mask.png")
    source = SegDirSource(folders)
    case = source.case(0)
    assert case.study.image.shape == (64, 64) and "label_1" in case.study.structures
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image/label pairs"):
        SegDirSource(empty)
    with pytest.raises(ValueError, match="segdir:PATH"):
        make_source("segdir")


def test_synthetic_followup_scales_about_the_centroid(msd_dir: Path) -> None:
    source = SegDirSource(msd_dir)
    study = source.study(source.pairs[0])
    before = mask_metrics(study.structures["lesion_1"], study.spacing)
    grown = synthetic_followup(study, 1.5)
    after = mask_metrics(grown.structures["lesion_1"], grown.spacing)
    assert after["longest_diameter_mm"] / before["longest_diameter_mm"] == pytest.approx(1.5, rel=0.08)
    assert after["volume_ml"] / before["volume_ml"] == pytest.approx(1.5**3, rel=0.15)
    c0 = np.argwhere(study.structures["lesion_1"]).mean(0)
    c1 = np.argwhere(grown.structures["lesion_1"]).mean(0)
    assert np.abs(c0 - c1).max() < 0.6
    assert grown.meta["synthetic_followup"]["synthetic"] is True and grown.meta["synthetic_followup"]["scale"] == 1.5
    assert not study.meta.get("synthetic_followup")  # the original is untouched
    gone = synthetic_followup(study, 0.0)
    assert not gone.structures["lesion"].any() and gone.structures["liver"].sum() == study.structures["liver"].sum()
    # Follow-up templates on a single time point get a synthetic prior/current pair.
    case = SegDirSource(msd_dir, templates=["percent_change"]).case(4)
    assert case.prior is not None and case.study.meta["synthetic_followup"]["synthetic"]
    assert run_expert(case)["correct"]


def test_real_time_points_are_paired(tmp_path: Path, synth) -> None:
    root = tmp_path / "tp"
    for k, semi in enumerate(((6.0, 4.0, 4.0), (9.0, 6.0, 5.0))):
        image, labels = synth.volume_with_lesion(k, semi=semi)
        synth.save_nifti(root / f"pat_t{k}.nii.gz", image)
        synth.save_nifti(root / f"pat_t{k}_seg.nii.gz", labels)
    (root / "dataset.json").write_text(json.dumps({"labels": {"1": "liver", "2": "metastasis"}}))  # names only
    source = SegDirSource(root, templates=["lesion_grown"])
    assert source.priors == {"pat_t1": "pat_t0"}
    case = source.case(0)
    assert case.answer == "yes" and case.prior is not None
    assert "synthetic_followup" not in case.study.meta and case.study.meta["case_name"] == "pat_t1"


@pytest.mark.parametrize("mode", ["oracle", "predicted"])
def test_cli_generate_and_eval_on_segdir(msd_dir: Path, tmp_path: Path, capsys, mode: str) -> None:
    out = tmp_path / "cases"
    assert main(["generate", "--source", f"segdir:{msd_dir}", "--n", "3", "--out", str(out)]) == 0
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 3 and all((out / r["file"]).exists() for r in index)
    capsys.readouterr()
    args = ["eval", "--source", f"segdir:{msd_dir}", "--n", "6", "--json", "--segmenter", "threshold"]
    assert main([*args, "--tool-mode", mode]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 6 and summary["tool_errors"] == 0 and summary["tool_mode"] == mode
    # Oracle: the known answers; predicted: answers from threshold masks of annotator boxes.
    assert summary["accuracy"] == 1.0 if mode == "oracle" else summary["accuracy"] >= 0.8
