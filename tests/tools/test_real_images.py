"""zoom, window and measure on real images that ship in wheels (pydicom's CT, stardist's nuclei)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from medgym.tools import TOOLS, Study, ToolContext, run_tool


@pytest.fixture(scope="module")
def ct() -> Study:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return Study(image=hu, spacing=tuple(float(s) for s in ds.PixelSpacing), modality=ds.Modality)


@pytest.fixture(scope="module")
def nuclei() -> tuple[Study, np.ndarray]:
    root = Path(importlib.util.find_spec("stardist").submodule_search_locations[0]) / "data" / "images"
    img = tifffile.imread(root / "img2d.tif").astype(np.float32)
    labels = tifffile.imread(root / "mask2d.tif")
    study = Study(image=img, spacing=(1.0, 1.0), modality="microscopy", structures={"nuclei": labels > 0})
    return study, labels


def test_window_on_real_ct_maps_hounsfield_units(ct):
    ctx = ToolContext(study=ct, tool_mode="oracle")
    for preset, (centre, width) in {"lung": (-600, 1500), "bone": (400, 1800)}.items():
        shown = run_tool(TOOLS, "window", {"preset": preset}, ctx).images[0][..., 0].astype(float)
        expected = np.clip((ct.image - (centre - width / 2)) / width, 0, 1) * 255
        assert np.abs(shown - expected).max() <= 1.0, preset
    narrow = run_tool(TOOLS, "window", {"center": 0, "width": 2}, ctx).images[0][..., 0]
    assert set(np.unique(narrow[np.abs(ct.image) > 5])) <= {0, 255}


def test_zoom_on_real_ct_keeps_the_windowed_pixels(ct):
    r = run_tool(TOOLS, "zoom", {"boxes": [[32, 32, 96, 96]], "size": 64}, ToolContext(study=ct, tool_mode="oracle"))
    full = run_tool(TOOLS, "window", {"preset": "soft_tissue"}, ToolContext(study=ct, tool_mode="oracle")).images[0]
    assert np.array_equal(r.images[0], full[32:96, 32:96])  # same size: the crop is the displayed pixels


def test_measure_on_real_nuclei_matches_the_label_map(nuclei):
    study, labels = nuclei
    ctx = ToolContext(study=study, tool_mode="oracle")
    r = run_tool(TOOLS, "measure", {"target": "nuclei"}, ctx)
    expected = ndimage.label(labels > 0, structure=np.ones((3, 3)))[1]
    assert r.data["components"] == expected
    sizes = sorted((np.bincount(ndimage.label(labels > 0, structure=np.ones((3, 3)))[0].ravel())[1:]), reverse=True)
    assert r.data["per_component"][0]["area_mm2"] == pytest.approx(float(sizes[0]))
    assert r.data["mean_intensity"] == pytest.approx(float(study.image[labels > 0].mean()), rel=1e-4)
