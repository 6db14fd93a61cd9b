"""Lossless round trips: ``Case.save`` -> ``Case.load`` keeps every field of the case and of its
studies (arrays with their dtype), for cases from every source; a trace episode written and read
back equals itself, with every image it names on disk under its hash."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from medgym.environments.case import CASE_FORMAT, Case, ToolCall, decode_value, encode_value
from medgym.environments.sources import PhantomSource, SamplesSource, SegDirSource, VQASource
from medgym.tools.base import Study
from medgym.traces import ImageStore, ToolCallRecord, TraceEpisode, TraceHeader, TraceStep, TraceWriter, read_traces
from medgym.traces.replay import ImageChecker, episode_images, verify_episode
from medgym.traces.store import image_hash


def differences(a: Any, b: Any, path: str = "case") -> list[str]:
    """Every place two values differ: dataclasses field by field, arrays by dtype, shape and
    content (NaN equal to NaN), containers by type, length and key order, scalars by type and value."""
    if type(a) is not type(b):
        return [f"{path}: type {type(a).__name__} != {type(b).__name__}"]
    if dataclasses.is_dataclass(a):
        out = []
        for f in dataclasses.fields(a):
            out += differences(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
        return out
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{path}: array {a.dtype}{a.shape} != {b.dtype}{b.shape}"]
        nan_ok = a.dtype.kind in "fc"
        return [] if np.array_equal(a, b, equal_nan=nan_ok) else [f"{path}: array values differ"]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{path}: keys {list(a)} != {list(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}[{k!r}]")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, (float, np.floating)) and math.isnan(a) and math.isnan(b):
        return []
    if isinstance(a, (float, np.floating)) and a == b and math.copysign(1, a) != math.copysign(1, b):
        return [f"{path}: {a!r} != {b!r} (sign of zero)"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def assert_round_trip(case: Case, folder: Path) -> Case:
    loaded = Case.load(case.save(folder))
    diffs = differences(case, loaded)
    assert not diffs, "\n".join(diffs)
    return loaded


def realdata_helpers():
    """The synthetic NIfTI helpers of tests/environments/realdata/conftest.py (conftest is not importable)."""
    path = Path(__file__).parent / "realdata" / "conftest.py"
    spec = importlib.util.spec_from_file_location("realdata_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_segdir(tmp_path_factory) -> Path:
    """A two-case Decathlon-style folder of tiny NIfTI volumes, as the realdata tests write it."""
    synth = realdata_helpers()
    root = tmp_path_factory.mktemp("segdir")
    training = []
    for i, flip in enumerate((False, True)):
        image, labels = synth.volume_with_lesion(i)
        synth.save_nifti(root / "imagesTr" / f"liver_{i}.nii.gz", image, flip)
        synth.save_nifti(root / "labelsTr" / f"liver_{i}.nii.gz", labels, flip)
        training.append({"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"})
    meta = {"name": "Tiny", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "cancer"}}
    (root / "dataset.json").write_text(json.dumps({**meta, "training": training}))
    return root


# ----------------------------------------------------------------- the comparator itself


def test_the_comparator_sees_every_kind_of_loss():
    study = Study(image=np.zeros((4, 4), np.float32), spacing=(1.0, 1.0), meta={"t": (1, 2)})
    same = dataclasses.replace(study, image=study.image.copy(), meta={"t": (1, 2)})
    assert differences(study, same) == []
    losses = {
        "dtype": dataclasses.replace(study, image=study.image.astype(np.float64)),
        "tuple": dataclasses.replace(study, meta={"t": [1, 2]}),
        "int": dataclasses.replace(study, spacing=(1, 1.0)),
        "order": dataclasses.replace(study, meta={"u": 1, "t": (1, 2)}),
        "slice": dataclasses.replace(study, display_slice=0),
        "zero": dataclasses.replace(study, spacing=(-0.0, 1.0)),
    }
    for what, other in losses.items():
        assert differences(study, other), what


def test_values_json_has_no_literal_for_come_back_with_their_type():
    arrays: dict[str, np.ndarray] = {}
    value = {
        "tuple": (1, (2.5, "x"), []),
        "nan": float("nan"),
        "inf": [float("inf"), float("-inf"), -0.0, 1e308, 5e-324],
        "big": 10**40,
        "numpy": [np.int16(-3), np.float32(0.1), np.bool_(True), np.float64("nan")],
        "array": np.arange(6, dtype=np.uint16).reshape(2, 3),
        "keys": {1: "a", (2, 3): "b", None: "c"},
        "__medgym__": "a real key named like the tag",
        "path": Path("a/b.nii.gz"),
        "text": "\x00 \u2028 \U0001f600",
    }
    text = json.dumps(encode_value(value, arrays), allow_nan=False)  # standard JSON
    assert differences(value, decode_value(json.loads(text), arrays), "value") == []
    with pytest.raises(TypeError, match="cannot save a object"):
        encode_value(object(), arrays)


# ----------------------------------------------------------------- cases from every source


@pytest.mark.parametrize("seed", range(8))
def test_phantom_2d_cases_round_trip(tmp_path, seed):
    case = PhantomSource().case(seed)
    assert_round_trip(case, tmp_path)


def test_phantom_3d_case_round_trips_with_its_display_slice(tmp_path):
    case = PhantomSource(templates=["lesion_volume"]).case(0)
    assert case.study.is_3d
    case.study.display_slice = 2  # not the default middle slice: load must not recompute it
    loaded = assert_round_trip(case, tmp_path)
    assert loaded.study.display_slice == 2 and loaded.study.meta == case.study.meta


@pytest.mark.parametrize("template", ["percent_change", "lesion_grown", "response_category"])
def test_phantom_follow_up_pairs_round_trip_with_the_prior(tmp_path, template):
    case = PhantomSource(templates=[template]).case(4)
    assert case.prior is not None
    loaded = assert_round_trip(case, tmp_path)
    assert loaded.prior is not None and list(loaded.prior.structures) == list(case.prior.structures)


@pytest.mark.parametrize("seed", [0, 2, 8, 15, 17])  # nuclei, CT and MR DICOM, ultrasound, IHC slide
def test_samples_cases_round_trip(tmp_path, seed):
    assert_round_trip(SamplesSource(tool_mode="oracle").case(seed), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(18))
def test_every_samples_case_round_trips(tmp_path, seed):
    assert_round_trip(SamplesSource(tool_mode="oracle").case(seed), tmp_path)


def test_segdir_cases_round_trip_including_synthetic_follow_ups(tmp_path, tiny_segdir):
    source = SegDirSource(tiny_segdir)
    cases = [source.case(seed) for seed in range(6)]
    cases.append(SegDirSource(tiny_segdir, templates=["percent_change"]).case(4))
    assert any(c.prior is not None for c in cases) and any(c.study.is_3d for c in cases)
    for case in cases:
        assert_round_trip(case, tmp_path / case.case_id)
    assert "synthetic_followup" in cases[-1].study.meta  # meta with nested settings came back too


def test_vqa_cases_round_trip(tmp_path):
    root = tmp_path / "vqa"
    (root / "VQA_RAD Image Folder").mkdir(parents=True)
    Image.fromarray(np.full((32, 48), 90, np.uint8)).save(root / "VQA_RAD Image Folder" / "synpic1.jpg")
    rows = [
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a mass?", "answer": "No",
         "answer_type": "CLOSED", "question_type": "PRES"},
        {"qid": "a/b 2", "image_name": "synpic1.jpg", "question": "Where is it?", "answer": "Left lobe",
         "answer_type": "OPEN", "question_type": "POS"},
    ]  # fmt: skip
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    source = VQASource(root)
    for seed in range(len(source)):
        assert_round_trip(source.case(seed), tmp_path / "out")


def test_odd_values_in_cases_round_trip(tmp_path):
    """Everything a source could put in a case: odd text, numpy and tuple meta, arguments of every type."""
    image = np.arange(2 * 5 * 6, dtype=np.int16).reshape(2, 5, 6)
    mask = image % 3 == 0
    study = Study(
        image=image,
        spacing=(np.float64(2.5), 0.5, 0.5),
        modality="MR \u00e9",
        structures={"lesion_1": mask, "a/b c": ~mask, "": np.zeros_like(mask)},
        display_slice=1,
        meta={"axcodes": ("R", "A", "S"), "n": np.int64(7), "arr": np.eye(2, dtype=np.float32), "nan": float("nan")},
    )
    prior = dataclasses.replace(study, image=image.astype(np.float32) * -0.0, display_slice=0, meta={})
    case = Case(
        case_id="odd-1",
        source="test",
        seed=2**40,
        stage="measurement",
        template="t",
        question='What is "this"? \n\t\x00\u202e \U0001f600',
        answer_type="numeric",
        answer="-0.0",
        study=study,
        prior=prior,
        choices=["\u2028", ""],
        tolerance=1e-308,
        abs_tolerance=0,
        answer_box=[0.5, -0.0, 1e308, 3],
        unit="mm\u00b2",
        expert_calls=[ToolCall("zoom", {"boxes": [(1, 2, 3, 4)], "size": np.int32(64), "x": None, "k": {3: 4}})],
    )
    assert_round_trip(case, tmp_path)


def test_case_files_written_before_studies_kept_their_settings_still_load(tmp_path):
    """Format 1 (arrays named by structure, no display slice or meta) is still read."""
    case = PhantomSource(templates=["percent_change"]).case(4)
    arrays = {}
    for tag, study in (("current", case.study), ("prior", case.prior)):
        arrays[f"{tag}/image"] = study.image
        arrays[f"{tag}/spacing"] = np.asarray(study.spacing)
        for name, mask in study.structures.items():
            arrays[f"{tag}/mask/{name}"] = mask
    np.savez_compressed(tmp_path / f"{case.case_id}.npz", **arrays)
    doc = {k: v for k, v in case.meta().items()}
    (tmp_path / f"{case.case_id}.json").write_text(json.dumps(doc))
    loaded = Case.load(tmp_path / f"{case.case_id}.json")
    expected = dataclasses.replace(
        case,
        study=dataclasses.replace(case.study, meta={}),
        prior=dataclasses.replace(case.prior, meta={}),
    )
    assert differences(expected, loaded) == []


def test_a_case_file_from_a_newer_medgym_is_refused_by_name(tmp_path):
    path = PhantomSource().case(1).save(tmp_path)
    doc = json.loads(path.read_text())
    assert doc["format"] == CASE_FORMAT
    path.write_text(json.dumps({**doc, "format": CASE_FORMAT + 1}))
    with pytest.raises(ValueError, match="newer than this medgym reads"):
        Case.load(path)


# ----------------------------------------------------------------- traces


def odd_episode(store: ImageStore) -> TraceEpisode:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), rng.integers(0, 256, (5, 5), dtype=np.uint8)]
    hashes = [store.put(img) for img in images]
    header = TraceHeader(
        episode_id="ep-\u00e9",
        source="phantom",
        seed=3,
        case_id="phantom-3",
        stage="measurement",
        template="longest_diameter",
        question="Q \x00\u2028\n\"'<script>",
        answer="12.5",
        answer_type="numeric",
        choices=["a", "\U0001f600"],
        answer_box=[1.0, -0.0, 1e308, 4.5],
        image=hashes[0],
        tool_versions={"zoom": "1"},
        source_config={"size": 128, "nested": {"x": [1, None, "y"]}},
        tolerance=0.05,
        abs_tolerance=0.0,
        unit="mm",
    )
    call = ToolCallRecord(
        name="zoom",
        arguments={"boxes": [[0, 0, 5, 5]], "odd": "\r\n\x1b", "big": 10**30},
        tool_version="1",
        text="Zoomed \u00e9",
        data={"boxes": [[0, 0, 5, 5]], "n": -0.0, "s": "NaN"},
        images=hashes,
        seconds=0.25,
    )
    steps = [
        TraceStep(index=1, model_text="<tool_call>{}</tool_call>\x00", calls=[call]),
        TraceStep(index=2, model_text="???", format_error="Format error: \u2028", reward=-0.1),
        TraceStep(index=3, model_text="<answer>12.5</answer>", answer="12.5", box=[0.0, 1.0, 2.0, 3.0], reward=1.3),
    ]
    return TraceEpisode(
        header=header,
        steps=steps,
        final_answer="12.5",
        final_box=[0.0, 1.0, 2.0, 3.0],
        score={"answer": 1.0, "grounding": None},
        reward=1.3,
    )


def test_a_trace_episode_written_and_read_back_equals_itself(tmp_path):
    writer = TraceWriter(tmp_path / "traces.jsonl")
    sealed = writer.write(odd_episode(writer.images))
    writer.close()
    trace = read_traces(tmp_path / "traces.jsonl")
    assert trace.problems == [] and trace.episodes == [sealed]
    (back,) = trace.episodes
    assert back.model_dump() == sealed.model_dump() and back.content_hash == back.compute_hash()
    checker = ImageChecker(ImageStore(tmp_path / "images", create=False))
    assert verify_episode(back, checker) == []
    for digest in episode_images(back):
        assert image_hash(checker.store.get(digest)) == digest


def test_env_traces_read_back_equal_and_rewrite_to_the_same_line(tmp_path):
    import gymnasium as gym

    from medgym.environments import ENV_ID

    path = tmp_path / "traces.jsonl"
    env = gym.make(ENV_ID, record_to=path, segmenter="threshold", tool_mode="predicted")
    turns = [
        '<tool_call>{"name": "zoom", "arguments": {"boxes": [[10, 10, 60, 60]], "size": 64}}</tool_call>',
        '<tool_call>{"name": "window", "arguments": {"center": NaN, "width": 1e400}}</tool_call>',
        '<tool_call>{"name": "segment\ud800", "arguments": {"box": [0, 0, 1e308, 1e308]}}</tool_call>',
        "<answer>maybe \x00\u2028</answer><box>[1, 2, 30, 40]</box>",
    ]
    for seed in range(3):
        env.reset(seed=seed)
        for turn in turns:
            env.step(turn)
    env.close()
    trace = read_traces(path)
    assert trace.problems == [] and len(trace.episodes) == 3
    checker = ImageChecker(ImageStore(tmp_path / "images", create=False))
    for episode in trace.episodes:
        assert verify_episode(episode, checker) == []
        assert all(image_hash(checker.store.get(h)) == h for h in episode_images(episode))
    # Read -> write -> read is the identity, byte for byte.
    again = TraceWriter(tmp_path / "again" / "traces.jsonl")
    for episode in trace.episodes:
        assert again.write(episode) == episode
    assert (tmp_path / "again" / "traces.jsonl").read_bytes() == path.read_bytes()
