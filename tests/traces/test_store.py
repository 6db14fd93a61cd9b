"""Trace store: append-only lines, images once by hash, torn lines reported, hash sealing."""

from __future__ import annotations

import os

import numpy as np
import pytest

from medgym.traces import ImageStore, TraceEpisode, TraceHeader, TraceStep, TraceWriter, image_hash, read_traces


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


# --- the background image writer ------------------------------------------------------------


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(n)]


def test_background_store_hashes_like_the_sync_one_and_flush_writes_every_image(tmp_path):
    store = ImageStore(tmp_path / "bg", background=True)
    imgs = _images(12)
    digests = [store.put(img) for img in imgs]
    assert digests == [image_hash(img) for img in imgs] == [ImageStore(tmp_path / "sync").put(img) for img in imgs]
    store.flush()
    reader = ImageStore(tmp_path / "bg", create=False)  # another reader, after the flush
    for img, digest in zip(imgs, digests, strict=True):
        assert np.array_equal(reader.get(digest), img)
    assert not list((tmp_path / "bg").glob("*.tmp"))


def test_hash_is_content_addressed_and_stable():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    # Fixed digest: the same pixels get the same file name in every run and every version.
    assert image_hash(img) == "357817a6d8b2cd2203de447f5de14646211e9c7fa6c4db3bf087615f26d38f8e"
    assert image_hash(np.asfortranarray(img)) == image_hash(img)
    assert image_hash(img.reshape(3, 2, 3)) != image_hash(img)
    assert image_hash(img.astype(np.uint16)) != image_hash(img)


def test_a_pending_image_is_readable_from_its_store_and_later_edits_of_the_array_do_not_leak(tmp_path):
    store = ImageStore(tmp_path, background=True)
    img = _images(1)[0]
    original = img.copy()
    digest = store.put(img)
    img[:] = 0  # the caller reuses its buffer before the writer ran
    assert np.array_equal(store.get(digest), original)
    store.flush()
    assert np.array_equal(ImageStore(tmp_path).get(digest), original)


@pytest.mark.parametrize("background", [False, True])
def test_an_image_put_again_is_not_encoded_again(tmp_path, monkeypatch, background):
    store = ImageStore(tmp_path, background=background)
    writes: list[str] = []
    real = store._write
    monkeypatch.setattr(store, "_write", lambda digest, arr: (writes.append(digest), real(digest, arr)))
    img = _images(1)[0]
    assert len({store.put(img), store.put(img.copy()), store.put(img)}) == 1
    store.flush()
    assert len(writes) == 1


def test_an_episode_line_is_written_after_its_images(tmp_path):
    writer = TraceWriter(tmp_path / "t.jsonl")
    assert writer.images.background
    digests = [writer.images.put(img) for img in _images(20, seed=1)]
    writer.write(_episode(0))  # no explicit flush: write waits for the images
    assert all(writer.images.path(d).is_file() for d in digests)
    assert [e.header.episode_id for e in read_traces(tmp_path / "t.jsonl").episodes] == ["e0"]


def test_many_threads_share_one_background_store(tmp_path):
    import threading

    store = ImageStore(tmp_path, background=True)
    imgs = _images(40, seed=2)
    got: list[str] = []
    threads = [threading.Thread(target=lambda k=k: got.extend(store.put(img) for img in imgs[k::4])) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.flush()
    assert sorted(got) == sorted(image_hash(img) for img in imgs)
    assert len(list(tmp_path.glob("*.png"))) == 40


def test_a_failed_write_is_raised_by_flush_and_the_next_put_retries(tmp_path):
    import shutil

    root = tmp_path / "images"
    writer = TraceWriter(tmp_path / "t.jsonl")
    shutil.rmtree(root)  # the folder vanished under the writer
    img = _images(1)[0]
    writer.images.put(img)
    with pytest.raises(OSError, match="could not write image"):
        writer.write(_episode(0))
    assert not (tmp_path / "t.jsonl").exists(), "no episode line names an image that is not on disk"
    root.mkdir()
    digest = writer.images.put(img)
    writer.close()
    assert writer.images.path(digest).is_file()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.timeout(60)
def test_a_forked_child_writes_its_own_images(tmp_path):
    store = ImageStore(tmp_path, background=True)
    first, second = _images(2, seed=3)
    store.put(first)  # the parent's writer thread is running now
    pid = os.fork()
    if pid == 0:  # the child: no writer thread of its own until it puts
        code = 1
        try:
            store.flush()
            digest = store.put(second)
            store.flush()
            code = 0 if store.path(digest).is_file() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    store.flush()
    assert store.path(image_hash(first)).is_file()


@pytest.mark.parametrize(
    "shape_dtype",
    [((24, 32, 3), np.uint8), ((17, 9), np.uint8), ((5, 7, 4), np.uint8), ((6, 6, 2), np.uint8), ((1, 1, 3), np.uint8)]
    + [((8, 5), np.bool_), ((4, 6), np.uint16)],  # through Pillow
)
def test_png_files_read_back_as_pillow_writes_them(tmp_path, shape_dtype):
    import io

    from PIL import Image

    from medgym.traces.store import png_bytes

    shape, dtype = shape_dtype
    rng = np.random.default_rng(5)
    img = (rng.integers(0, 2**16, shape) % (np.iinfo(dtype).max + 1 if dtype != np.bool_ else 2)).astype(dtype)
    img[: shape[0] // 2] = img.flat[0]  # flat rows compress, noisy ones do not
    ours = np.asarray(Image.open(io.BytesIO(png_bytes(img))))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    pillows = np.asarray(Image.open(buf))
    assert ours.dtype == pillows.dtype and ours.shape == pillows.shape
    assert np.array_equal(ours, pillows)
    Image.open(io.BytesIO(png_bytes(img))).verify()  # chunk CRCs and structure
