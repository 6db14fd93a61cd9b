"""retrieve: the knowledge base's content, ranking of the rule passages, the disk cache, the tool."""

from __future__ import annotations

import os
import re

import faiss
import numpy as np
import pytest

from medgym.tools import TOOLS
from medgym.tools import retrieve as r
from medgym.tools.base import Study, ToolContext
from medgym.tools.checker import check_tool

RULES = {
    "rule_nodule_followup": [
        "no routine follow-up",
        "CT at 6-12 months",
        "CT at 3 months, PET/CT or tissue sampling",
        "< 6 mm",
        "6 to 8 mm",
        "> 8 mm",
    ],
    "rule_tumour_response": [
        "complete response",
        "partial response",
        "progressive disease",
        "stable disease",
        "at least 30%",
        "at least 20%",
        "at least 5 mm",
    ],
    "rule_density_category": ["'fat'", "'fluid'", "'soft tissue'", "'calcified'", "-10", "20 HU", "100 HU"],
    "rule_lymph_node_size": [">= 10 mm", "< 10 mm", "10 to < 15 mm", ">= 15 mm", "short axis"],
    "rule_liver_lesion_size": ["'small'", "'intermediate'", "'large'", "< 10 mm", "10 to 20 mm", "> 20 mm"],
}


def make_ctx() -> ToolContext:
    image = np.zeros((32, 32), dtype=np.float32)
    lesion = np.zeros_like(image, dtype=bool)
    lesion[10:16, 10:16] = True
    structures = {"lesion_1": lesion, "body": np.ones_like(lesion), "empty": np.zeros_like(lesion)}
    return ToolContext(study=Study(image=image, spacing=(1.0, 1.0), structures=structures))


@pytest.fixture(scope="module", autouse=True)
def kb_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test here caches indexes in a private folder, never in the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDGYM_CACHE", str(tmp_path_factory.mktemp("medgym-cache")))
        r.clear_caches()
        yield
    r.clear_caches()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder and no index in memory."""
    monkeypatch.setenv("MEDGYM_CACHE", str(tmp_path))
    r.clear_caches()
    yield tmp_path
    r.clear_caches()


@pytest.fixture
def embed_calls(monkeypatch):
    """Records the batch size of every embed() call."""
    calls: list[int] = []
    real = r.embed

    def counting(texts, *args, **kwargs):
        calls.append(len(texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(r, "embed", counting)
    return calls


# --- the knowledge base -------------------------------------------------------------------


def test_knowledge_base_is_large_unique_and_ascii():
    passages = r.load_passages()
    assert len(passages) >= 45
    ids = [p["id"] for p in passages]
    assert len(ids) == len(set(ids))
    for p in passages:
        assert set(p) == {"id", "topic", "title", "text"}
        for value in p.values():
            assert value.isascii(), f"{p['id']} has non-ASCII text: {value!r}"
            assert value.strip()


def test_rule_passages_state_the_exact_categories_and_thresholds():
    by_id = {p["id"]: p for p in r.load_passages()}
    for pid, phrases in RULES.items():
        assert pid in by_id, f"rule passage {pid} missing"
        for phrase in phrases:
            assert phrase in by_id[pid]["text"], f"{pid} lacks {phrase!r}"
    assert "not clinical guidance" in by_id["disclaimer"]["text"]


def test_windowing_presets_match_the_window_tool():
    from medgym.tools.imaging import WINDOW_PRESETS

    by_id = {p["id"]: p["text"] for p in r.load_passages()}
    for preset, (center, width) in WINDOW_PRESETS.items():
        text = by_id[f"window_{preset}"]
        assert f"level {center:g} HU, width {width:g} HU" in text, (preset, text)


def test_load_passages_returns_a_copy():
    first = r.load_passages()
    first[0]["text"] = "changed"
    assert r.load_passages()[0]["text"] != "changed"


# --- ranking ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("what follow-up for a 7 mm lung nodule", "rule_nodule_followup"),
        ("lesion grew from 20 to 26 mm, response category", "rule_tumour_response"),
        ("lesion shrank from 30 to 18 mm, response category", "rule_tumour_response"),
        ("mean attenuation -50 HU fat", "rule_density_category"),
        ("lymph node short axis enlarged", "rule_lymph_node_size"),
        ("liver lesion size class for a 15 mm lesion", "rule_liver_lesion_size"),
        ("which side of the image is the patient's left", "conv_left_right"),
        ("volume in mL from the number of voxels", "meas_volume"),
        ("lung window level and width", "window_lung"),
    ],
)
def test_query_finds_the_right_passage_in_top_3(query, expected):
    hits = r.search(query, 3)
    assert expected in [h["id"] for h in hits], [(h["id"], h["score"]) for h in hits]


def test_search_scores_are_sorted_rounded_and_k_is_clipped():
    hits = r.search("pulmonary nodule follow-up by size", 5)
    assert len(hits) == 5
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(s == round(s, 4) for s in scores)
    assert hits[0]["id"] == "rule_nodule_followup"
    assert len(r.search("nodule", 1000)) == len(r.load_passages())


# --- the disk cache -----------------------------------------------------------------------


TINY_KB = (
    '{"id": "air", "topic": "t", "title": "Air", "text": "Air measures -1000 HU."}\n'
    '{"id": "water", "topic": "t", "title": "Water", "text": "Water measures 0 HU."}\n'
    '{"id": "node", "topic": "t", "title": "Lymph node", "text": "Nodes are enlarged from 10 mm short axis."}\n'
)


@pytest.fixture
def tiny_kb(fresh_cache, monkeypatch, tmp_path):
    """A three-passage knowledge base: the cache logic is the same, the embedding is cheap."""
    kb = tmp_path / "passages.jsonl"
    kb.write_text(TINY_KB)
    monkeypatch.setattr(r, "_passages_resource", lambda: kb)
    r.clear_caches()
    return kb


def test_index_is_cached_on_disk_and_reloaded_without_embedding(tiny_kb, embed_calls):
    assert r.get_index().ntotal == 3
    assert embed_calls == [3], "the first call embeds the knowledge base once"
    assert list(r.cache_dir().glob("*.faiss")) == [r.index_path()]
    assert not list(r.cache_dir().glob("*.tmp")), "no temporary file is left behind"
    mtime = r.index_path().stat().st_mtime_ns

    r.clear_caches()
    assert r.get_index().ntotal == 3
    assert embed_calls == [3], "a fresh in-memory state must read the cache, not re-embed"
    assert r.index_path().stat().st_mtime_ns == mtime
    assert [h["id"] for h in r.search("attenuation of air", 1)] == ["air"]
    assert embed_calls == [3, 1], "a search embeds only the query"


def test_knowledge_base_index_is_reloaded_from_disk(embed_calls):
    r.search("lymph node short axis enlarged", 1)  # builds the module's cache if no test did yet
    path = r.index_path()
    assert path.is_file() and str(path).startswith(os.environ["MEDGYM_CACHE"])
    r.clear_caches()
    embed_calls.clear()
    assert r.get_index().ntotal == len(r.load_passages())
    assert embed_calls == []


@pytest.mark.parametrize("garbage", [b"", b"not a faiss index at all"])
def test_corrupt_cache_is_rebuilt(tiny_kb, embed_calls, garbage):
    path = r.index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(garbage)

    assert r.get_index().ntotal == 3
    assert embed_calls == [3]
    assert faiss.read_index(str(path)).ntotal == 3, "the corrupt file was replaced by a good one"


def test_cache_of_the_wrong_size_is_rebuilt(tiny_kb, embed_calls):
    path = r.index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = faiss.IndexFlatIP(384)
    stale.add(np.eye(5, 384, dtype=np.float32))
    faiss.write_index(stale, str(path))

    assert r.get_index().ntotal == 3
    assert embed_calls == [3]


def test_edited_knowledge_base_gets_a_new_cache_file(tiny_kb):
    before = r.index_path()
    assert [h["id"] for h in r.search("attenuation of water", 1)] == ["water"]
    tiny_kb.write_text(TINY_KB.replace("Water measures 0 HU.", "Simple fluid is near 0 HU."))
    r.clear_caches()
    assert r.index_path() != before
    assert [h["id"] for h in r.search("attenuation of water", 1)] == ["water"]
    assert len(list(before.parent.glob("*.faiss"))) == 2


def test_invalid_knowledge_base_line_is_reported(tiny_kb):
    tiny_kb.write_text('{"id": "a", "title": "no topic or text"}\n')
    r.clear_caches()
    with pytest.raises(ValueError, match="line 1"):
        r.load_passages()


def test_unwritable_cache_is_not_fatal(tiny_kb, monkeypatch):
    blocker = tiny_kb.parent / "a-file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("MEDGYM_CACHE", str(blocker / "cache"))
    r.clear_caches()
    assert r.search("lymph node short axis", 1)[0]["id"] == "node"


# --- the tool -----------------------------------------------------------------------------


def test_tool_result_text_and_data():
    result = r.SPEC.run({"query": "what follow-up for a 7 mm lung nodule", "k": 2}, make_ctx())
    assert not result.error
    assert result.images == []
    passages = result.data["passages"]
    assert len(passages) == 2
    assert set(passages[0]) == {"id", "title", "score", "text"}
    assert passages[0]["id"] == "rule_nodule_followup"
    assert "CT at 6-12 months" in result.text
    assert re.search(r"^\[1\] \(rule_nodule_followup, ", result.text, flags=re.M)
    assert re.search(r"^\[2\] \(", result.text, flags=re.M)
    assert "[3]" not in result.text
    assert f"(score {passages[0]['score']:.4f})" in result.text


def test_tool_is_deterministic_and_ignores_the_image():
    args = {"query": "tumour response criteria", "k": 5}
    first = r.SPEC.run(args, make_ctx())
    other = ToolContext(study=Study(image=np.full((8, 8, 8), 40.0), spacing=(2.0, 1.0, 1.0)))
    assert first.fingerprint() == r.SPEC.run(args, make_ctx()).fingerprint()
    assert first.fingerprint() == r.SPEC.run(args, other).fingerprint()


@pytest.mark.parametrize(
    "args",
    [{"query": "ab"}, {"query": "x" * 10, "k": 0}, {"query": "x" * 10, "k": 11}, {"query": "x" * 501}, {}],
)
def test_bad_arguments_are_error_results(args):
    ctx = ToolContext(study=Study(image=np.zeros((8, 8)), spacing=(1.0, 1.0)))
    result = r.SPEC.run(args, ctx)
    assert result.error
    assert result.text.startswith("Error: invalid arguments for retrieve")


def test_registered_and_honours_the_tool_contract():
    assert TOOLS["retrieve"] is r.SPEC
    assert check_tool(r.SPEC, make_ctx)
    schema = r.SPEC.json_schema()["function"]["parameters"]
    assert schema["required"] == ["query"]
    assert schema["properties"]["k"]["maximum"] == 10


def test_benchmark_helpers_build_and_query_an_index():
    texts = ["The spleen is in the left upper quadrant.", "Fat measures about -100 HU.", "Bone window"]
    vectors = r.embed(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    index = r.build_index(texts)
    scores, rows = r.query_index(index, ["attenuation of fat", "where is the spleen"], 1)
    assert rows[:, 0].tolist() == [1, 0]
    assert scores.shape == (2, 1)


# --- index kind by corpus size --------------------------------------------------------------


def _unit_vectors(n: int, seed: int, d: int = 64) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_index_kind_follows_the_corpus_size(monkeypatch):
    assert r.index_kind(len(r.load_passages())) == "flat", "the shipped knowledge base stays exact"
    assert r.index_kind(r.ANN_MIN_VECTORS - 1) == "flat"
    assert r.index_kind(r.ANN_MIN_VECTORS) == "hnsw"
    monkeypatch.setattr(r, "ANN_MIN_VECTORS", 1000)  # a few thousand vectors build in well under a second
    assert isinstance(r.make_index(_unit_vectors(999, 0)), faiss.IndexFlatIP)
    ann = r.make_index(_unit_vectors(3000, 0))
    assert isinstance(ann, faiss.IndexHNSWFlat) and r.kind_of(ann) == "hnsw"
    assert ann.metric_type == faiss.METRIC_INNER_PRODUCT and ann.hnsw.efSearch == r.HNSW_EF_SEARCH
    with pytest.raises(ValueError, match="unknown index kind"):
        r.make_index(_unit_vectors(10, 0), kind="ivf")  # type: ignore[arg-type]


def test_hnsw_recall_at_5_against_flat():
    vectors, queries = _unit_vectors(3000, 1), _unit_vectors(200, 2)
    flat_scores, flat_rows = r.make_index(vectors, "flat").search(queries, 5)
    ann_scores, ann_rows = r.make_index(vectors, "hnsw").search(queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ann_rows, flat_rows, strict=True)])
    assert recall >= 0.95, recall
    # Where both found a vector, they agree on its score: HNSW ranks by the same inner product.
    for a_s, a_r, f_s, f_r in zip(ann_scores, ann_rows, flat_scores, flat_rows, strict=True):
        same = dict(zip(f_r, f_s, strict=True))
        for score, row in zip(a_s, a_r, strict=True):
            if row in same:
                assert score == pytest.approx(same[row], abs=1e-5)


def test_cached_index_of_the_wrong_kind_is_rebuilt(tiny_kb, embed_calls):
    path = r.index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(r.make_index(_unit_vectors(3, 3, d=384), "hnsw"), str(path))
    assert r.kind_of(r.get_index()) == "flat"
    assert embed_calls == [3]
