"""Tests of the segment tool: LiteMedSAM on real nuclei, a tiny SAM, the Otsu fallback, structures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from medgym.tools import segmenters
from medgym.tools.base import Study, ToolContext
from medgym.tools.checker import check_tool
from medgym.tools.segment import SPEC, SegmentArgs, segment


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def disk(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def check_ctx(segmenter: str = "threshold") -> ToolContext:
    """The standard check context: a 256x256 CT slice with body, lesion, lesion_1 and empty."""
    rng = np.random.default_rng(0)
    body = disk((256, 256), (128, 128), 110)
    lesion = disk((256, 256), (100, 100), 18)
    image = np.where(body, 40.0, -1000.0) + np.where(lesion, 60.0, 0.0) + rng.normal(0, 8, (256, 256))
    structures = {"body": body, "lesion": lesion, "lesion_1": lesion, "empty": np.zeros((256, 256), bool)}
    study = Study(image=image.astype(np.float32), spacing=(0.8, 0.8), structures=structures)
    return ToolContext(study=study, segmenter=segmenter, tool_mode="oracle")


def test_contract() -> None:
    assert check_tool(SPEC, check_ctx)


# --- LiteMedSAM on real fluorescence nuclei -------------------------------------------------


def _nuclei() -> tuple[np.ndarray, np.ndarray]:
    tifffile = pytest.importorskip("tifffile")
    spec = importlib.util.find_spec("stardist")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("stardist's sample images are not installed")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "images"
    return tifffile.imread(folder / "img2d.tif"), tifffile.imread(folder / "mask2d.tif")


def test_medsam_nuclei_dice_and_embedding_cache() -> None:
    img, gt = _nuclei()
    study = Study(image=img.astype(np.float32), spacing=(1.0, 1.0), modality="microscopy")
    ctx = ToolContext(study=study, segmenter="medsam", tool_mode="oracle")
    labels, counts = np.unique(gt[gt > 0], return_counts=True)
    largest = labels[np.argsort(-counts, kind="stable")][:8]

    backend = segmenters.medsam_backend()
    backend.clear_cache()
    calls: list[int] = []
    hook = backend.net.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        dices = []
        for label in largest:
            ys, xs = np.nonzero(gt == label)
            box = [xs.min() - 3.0, ys.min() - 3.0, xs.max() + 4.0, ys.max() + 4.0]
            result = segment(SegmentArgs(box=box), ctx)
            mask = ctx.masks[result.data["mask_id"]]
            assert mask.shape == img.shape and mask.dtype == bool
            assert result.data["backend"] == "medsam" and result.images[0].shape == (*img.shape, 3)
            dices.append(dice(mask, gt == label))
    finally:
        hook.remove()
    assert np.mean(dices) >= 0.85, dices
    # One image, eight prompts: the image encoder ran once. Counted, not timed: wall times
    # on a shared CPU are too noisy to assert on.
    assert len(calls) == 1


def test_medsam_point_prompt_segments_the_nucleus() -> None:
    img, gt = _nuclei()
    ctx = ToolContext(study=Study(image=img.astype(np.float32), spacing=(1.0, 1.0), modality="microscopy"))
    label = np.unique(gt[gt > 0], return_counts=True)
    label = label[0][np.argmax(label[1])]
    ys, xs = np.nonzero(gt == label)
    result = segment(SegmentArgs(point=[float(xs.mean()), float(ys.mean())]), ctx)
    assert dice(ctx.masks[result.data["mask_id"]], gt == label) > 0.7


# --- segment_anything SAM through a tiny random checkpoint ----------------------------------


def _tiny_sam(checkpoint: str | None = None) -> torch.nn.Module:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    size, patch, dim = 64, 16, 32
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=size, patch_size=patch, embed_dim=dim, depth=1, num_heads=2, out_chans=dim
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(size // patch,) * 2,
            input_image_size=(size, size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            iou_head_hidden_dim=16,
        ),
    )
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    return sam


def test_sam_backend_loads_checkpoint_and_encodes_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        checkpoint = tmp_path / "tiny_sam.pth"
        torch.save(_tiny_sam().state_dict(), checkpoint)
    monkeypatch.setitem(segmenters.SAM_BUILDERS, "tiny_test", _tiny_sam)
    ctx = check_ctx("sam")
    ctx.sam_model_type, ctx.sam_checkpoint = "tiny_test", str(checkpoint)

    backend = segmenters.sam_backend("tiny_test", str(checkpoint))
    calls: list[int] = []
    hook = backend.predictor.model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = SPEC.run({"box": [60, 60, 140, 140]}, ctx)
        second = SPEC.run({"point": [100, 100]}, ctx)
    finally:
        hook.remove()
    for result in (first, second):
        assert not result.error, result.text
        mask = ctx.masks[result.data["mask_id"]]
        assert mask.shape == (256, 256) and mask.any()
        assert result.data["area_px"] == int(mask.sum()) and len(result.data["box"]) == 4
        assert result.data["backend"] == "sam"
    assert len(calls) == 1 and backend.encoder_calls == 1


def test_sam_without_checkpoint_is_a_configuration_error() -> None:
    ctx = check_ctx("sam")
    with pytest.raises(ValueError, match="sam_checkpoint"):
        SPEC.run({"box": [60, 60, 140, 140]}, ctx)


# --- classical fallback ---------------------------------------------------------------------


def test_threshold_backend_bright_disk() -> None:
    rng = np.random.default_rng(1)
    truth = disk((200, 200), (90, 110), 25)
    image = np.where(truth, 200.0, 50.0) + rng.normal(0, 10, truth.shape)
    ctx = ToolContext(study=Study(image=image, spacing=(0.5, 0.5), modality="MR"), segmenter="threshold")
    result = segment(SegmentArgs(box=[75, 55, 145, 125]), ctx)
    assert dice(ctx.masks["mask_1"], truth) >= 0.95
    assert result.data["area_mm2"] == pytest.approx(truth.sum() * 0.25, rel=0.05)


def test_threshold_point_prompt_small_disk() -> None:
    rng = np.random.default_rng(3)
    truth = disk((100, 100), (40, 60), 9)  # smaller than the 32-px box that stands in for a point
    image = np.where(truth, 200.0, 50.0) + rng.normal(0, 10, truth.shape)
    ctx = ToolContext(study=Study(image=image, spacing=(1.0, 1.0), modality="MR"), segmenter="threshold")
    result = segment(SegmentArgs(point=[62, 38]), ctx)
    assert dice(ctx.masks[result.data["mask_id"]], truth) >= 0.9


def test_threshold_dark_object_and_distractor() -> None:
    rng = np.random.default_rng(2)
    truth = disk((128, 128), (64, 64), 12)
    image = np.where(truth, 0.0, 100.0) + rng.normal(0, 5, truth.shape)
    image[34:42, 34:42] = 0.0  # a second dark blob inside the box but away from its centre
    ctx = ToolContext(study=Study(image=image, spacing=(1.0, 1.0), modality="MR"), segmenter="threshold")
    result = segment(SegmentArgs(box=[30, 30, 98, 98]), ctx)
    assert result.data["components"][0]["box"] == [52, 52, 77, 77]
    assert dice(ctx.masks["mask_1"], truth) >= 0.95


# --- structures, 3D and errors --------------------------------------------------------------


def ct3d_ctx() -> ToolContext:
    shape = (10, 64, 64)
    body = disk(shape, (5, 32, 32), 40)
    liver = disk(shape, (5, 28, 24), 14)
    spleen = disk(shape, (5, 36, 50), 8)
    les1 = disk(shape, (5, 28, 24), 4)
    les2 = disk(shape, (4, 36, 50), 3)
    image = np.where(body, 30.0, -1000.0) + np.where(liver, 30.0, 0) + np.where(les1 | les2, -40.0, 0)
    structures = {
        "body": body,
        "liver": liver,
        "spleen": spleen,
        "lesion_1": les1,
        "lesion_2": les2,
        "lesion": les1 | les2,
        "empty": np.zeros(shape, bool),
    }
    study = Study(image=image.astype(np.float32), spacing=(3.0, 0.7, 0.7), structures=structures, display_slice=5)
    return ToolContext(study=study, segmenter="threshold", tool_mode="oracle")


def test_structure_on_3d_study_is_exact_with_organs() -> None:
    ctx = ct3d_ctx()
    result = SPEC.run({"structure": "lesion"}, ctx)
    assert not result.error
    mask = ctx.masks["mask_1"]
    assert mask.shape == (10, 64, 64) and np.array_equal(mask, ctx.study.structures["lesion"])
    assert result.data["mask_id"] == "mask_1" and result.data["backend"] == "structure"
    assert [c["organ"] for c in result.data["components"]] == ["liver", "spleen"]
    assert "2 component(s)" in result.text and "in liver" in result.text and "in spleen" in result.text
    assert result.data["volume_ml"] == pytest.approx(mask.sum() * 3.0 * 0.49 / 1000, rel=1e-3)
    assert result.images[0].shape == (64, 64, 3) and result.images[0].dtype == np.uint8


def test_box_on_3d_study_fills_one_slice() -> None:
    ctx = ct3d_ctx()
    result = SPEC.run({"box": [30, 20, 60, 50], "slice_index": 4}, ctx)
    assert not result.error, result.text
    mask = ctx.masks[result.data["mask_id"]]
    assert mask.shape == (10, 64, 64) and mask[4].any()
    assert not np.delete(mask, 4, axis=0).any()
    assert result.data["slice_index"] == 4


def test_empty_structure_is_not_an_error() -> None:
    ctx = ct3d_ctx()
    result = SPEC.run({"structure": "empty"}, ctx)
    assert not result.error and "no mask stored" in result.text
    assert result.data["mask_id"] is None and result.data["area_px"] == 0 and ctx.masks == {}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"structure": "no_such"}, "liver"),  # the error lists the known names
        ({"box": [900, 900, 1000, 1000]}, "outside the image"),
        ({"point": [-5, 10]}, "outside the image"),
        ({"box": [1, 2, 3, 4], "structure": "lesion_1"}, "invalid arguments"),
        ({}, "invalid arguments"),
        ({"box": [10, 10, 20, 20], "slice_index": 99}, "outside the volume"),
    ],
)
def test_bad_prompts_are_error_results(args: dict, expected: str) -> None:
    ctx = ct3d_ctx()
    result = SPEC.run(args, ctx)
    assert result.error and expected in result.text
    assert ctx.masks == {}


def test_empty_model_output_is_an_input_error() -> None:
    ctx = ct3d_ctx()
    ctx.study.image[:] = 0.0  # a flat image: Otsu finds nothing
    result = SPEC.run({"box": [10, 10, 30, 30]}, ctx)
    assert result.error and "nothing was segmented" in result.text and "larger box" in result.text
