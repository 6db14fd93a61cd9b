"""Trace store: append-only lines, images once by hash, torn lines reported, hash sealing."""

from __future__ import annotations

import numpy as np

from medgym.traces import ImageStore, TraceEpisode, TraceHeader, TraceStep, TraceWriter, read_traces


def _episode(i: int) -> TraceEpisode:
    header = TraceHeader(
        episode_id=f"e{i}",
        source="phantom",
        seed=i,
        case_id=f"c{i}",
        stage="measurement",
        template="lesion_area",
        question="q",
        answer="1.0",
        answer_type="numeric",
    )
    return TraceEpisode(header=header, steps=[TraceStep(index=0, model_text="<answer>1.0</answer>", answer="1.0")])


def test_images_are_stored_once(tmp_path):
    store = ImageStore(tmp_path)
    img = np.zeros((8, 8, 3), np.uint8)
    assert store.put(img) == store.put(img.copy())
    assert len(list(tmp_path.glob("*.png"))) == 1
    assert np.array_equal(store.get(store.put(img)), img)


def test_torn_last_line_is_reported_and_earlier_episodes_load(tmp_path):
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path)
    sealed = [writer.write(_episode(i)) for i in range(3)]
    assert all(e.content_hash == e.compute_hash() for e in sealed)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # killed mid-write
    got = read_traces(path)
    assert [e.header.episode_id for e in got.episodes] == ["e0", "e1"]
    assert len(got.problems) == 1 and "torn last line" in got.problems[0]


def test_an_edited_episode_no_longer_matches_its_hash(tmp_path):
    path = tmp_path / "t.jsonl"
    TraceWriter(path).write(_episode(0))
    path.write_text(path.read_text().replace('"answer":"1.0"', '"answer":"2.0"', 1))
    ep = read_traces(path).episodes[0]
    assert ep.content_hash != ep.compute_hash()
