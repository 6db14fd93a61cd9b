"""`medgym bench`: throughput and latency figures on this machine (reported, never asserted).

- env steps/s with a zoom turn and with a measure turn on phantoms of ``size`` pixels, and the
  env's overhead over the bare tool call on the same input: with no trace, and with a trace
  (records, image hashes, PNGs). The bare call and both envs take turns step by step (same
  image, same arguments, warmed up), so the ratios of their medians come from one run under the
  same load. ``zoom_new_images`` moves the box by a pixel each step, so every step stores a new
  PNG (written by the trace's background thread; ``reset`` then waits for them as it writes the
  episode; see :func:`_bench_new_images`). The measure turn names the ground-truth lesion, so
  it runs in oracle tool mode.
- ``measure``: one measure call on the lesion of a ``size`` x ``size`` phantom.
- segment latency with LiteMedSAM: first prompt on a new image (image encoder) and
  further prompts on the same image (cached embedding);
- retrieval: query embedding (``encode``) and index search (``search``) timed apart, over an
  index of ``passages`` vectors of the kind :func:`medgym.tools.retrieve.index_kind` picks for
  that size, with the exact flat search's time and the index's recall@5 against it. The
  knowledge base's own passages are embedded for real; the rest are topic mixtures of them
  (random convex combinations of three passages plus a little noise): an approximate index's
  recall and speed depend on how vectors are spread, and uniform random vectors are unlike
  any text corpus.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medgym.environments.env import MedVQAEnv
from medgym.environments.sources import PhantomSource
from medgym.tools import TOOLS, ToolContext, run_tool

WARMUP = 10  # untimed steps per runner before timing: caches, allocators, the first PNG
EPISODE_STEPS = 50  # steps per episode in the env benchmarks (a reset, untimed, writes the trace)
QUESTION_TOPICS = (
    "follow-up for a {} mm lung nodule",
    "liver lesion of {} mm: which size class",
    "mean attenuation {} HU: which tissue",
    "lymph node with a {} mm short axis: enlarged?",
    "lesion grew from {} to 30 mm: response category",
    "window level and width for the lungs, case {}",
    "how to measure the longest diameter of a {} mm lesion",
    "volume in mL of a mask of {} voxels",
    "which side of image {} is the patient's left",
    "is a {} mm kidney normal",
)


def _percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3)}


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _case_with_lesion(size: int):
    source = PhantomSource(size=size, templates=["lesion_area"])
    return source.case(0)


class _EnvRunner:
    """One env stepping a fixed turn; resets (untimed in steps, timed apart) keep episodes realistic."""

    def __init__(self, case, size: int, tool_mode: str, record_to: Path | None):
        self.case = case
        self.env = MedVQAEnv(
            source=PhantomSource(size=size),
            image_size=size,
            segmenter="threshold",
            tool_mode=tool_mode,
            record_to=record_to,
        )
        self.env.reset(seed=0, options={"case": case})
        self.steps, self.resets, self.times, self.reset_times = 0, 0, [], []

    def step(self, text: str, timed: bool = True) -> None:
        if self.steps and self.steps % EPISODE_STEPS == 0:
            self.resets += 1
            t = _timed(lambda: self.env.reset(seed=self.resets, options={"case": self.case}))
            if timed:
                self.reset_times.append(t)
        self.steps += 1
        t = _timed(lambda: self.env.step(text))
        if timed:
            self.times.append(t)

    def close(self) -> None:
        self.env.close()


def _bare_call(name: str, arguments: dict[str, Any], ctx: ToolContext) -> float:
    t = time.perf_counter()
    run_tool(TOOLS, name, arguments, ctx)
    return time.perf_counter() - t


def _turn(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def _figures(env_times: list[float], bare: list[float]) -> dict[str, Any]:
    env_p50, bare_p50 = float(np.median(env_times)), float(np.median(bare))
    return {
        "env_steps_per_s": round(1.0 / env_p50, 1),
        "bare_tool_calls_per_s": round(1.0 / bare_p50, 1),
        "overhead_ratio": round(env_p50 / bare_p50, 3),  # of medians, measured side by side
        "env_step": _percentiles(env_times),
        "bare_call": _percentiles(bare),
    }


def bench_env(size: int, steps: int, trace_dir: Path) -> dict[str, dict[str, Any]]:
    """Bare call, env without a trace and env with one, in turn each step; medians and their ratios."""
    case = _case_with_lesion(size)
    q = size // 4
    turns = {
        "zoom": ("zoom", {"boxes": [[q, q, 2 * q, 2 * q]]}, "predicted"),
        "measure": ("measure", {"target": "lesion"}, "oracle"),
    }
    out: dict[str, dict[str, Any]] = {"env_no_trace": {}, "env_with_trace": {}}
    for label, (name, args, mode) in turns.items():
        ctx = ToolContext(study=case.study, segmenter="threshold", tool_mode=mode)
        text = _turn(name, args)
        plain = _EnvRunner(case, size, mode, None)
        traced = _EnvRunner(case, size, mode, trace_dir / f"{label}.jsonl")
        bare: list[float] = []
        for i in range(-WARMUP, steps):
            # Rotate who goes first, so none always runs right after another's cache misses.
            for k in range(3):
                who = (i + k) % 3
                if who == 0:
                    took = _bare_call(name, args, ctx)
                    if i >= 0:
                        bare.append(took)
                else:
                    (plain if who == 1 else traced).step(text, timed=i >= 0)
        plain.close()
        traced.close()
        out["env_no_trace"][label] = _figures(plain.times, bare)
        out["env_with_trace"][label] = _figures(traced.times, bare)
        if traced.reset_times:
            out["env_with_trace"][label]["reset_with_episode_write"] = _percentiles(traced.reset_times)
    out["env_with_trace"]["zoom_new_images"] = _bench_new_images(case, size, steps, trace_dir)
    return out


def _bench_new_images(case, size: int, steps: int, trace_dir: Path) -> dict[str, Any]:
    """Zoom with the box a pixel further each step, so each step stores a new PNG.

    The bare calls run first and the traced env after them, not in turn: the trace's writer
    thread keeps encoding while later calls run, and would slow the bare calls it overlapped.
    Each reset writes an episode and waits for its images (``reset_with_episode_write``).
    """
    q = size // 4

    def args(i: int) -> dict[str, Any]:
        return {"boxes": [[q + i % q, q + (i // q) % q, 2 * q + i % q, 2 * q + (i // q) % q]]}

    ctx = ToolContext(study=case.study, segmenter="threshold")
    bare = [_bare_call("zoom", args(i), ctx) for i in range(WARMUP + steps)][WARMUP:]
    traced = _EnvRunner(case, size, "predicted", trace_dir / "zoom_new_images.jsonl")
    for i in range(WARMUP + steps):
        traced.step(_turn("zoom", args(i)), timed=i >= WARMUP)
    traced.close()
    fig = _figures(traced.times, bare)
    if traced.reset_times:
        fig["reset_with_episode_write"] = _percentiles(traced.reset_times)
    return fig


def bench_measure(size: int, calls: int = 200) -> dict[str, Any]:
    """One measure call (the lesion of a size x size phantom), warm, ``calls`` times."""
    case = _case_with_lesion(size)
    ctx = ToolContext(study=case.study, segmenter="threshold", tool_mode="oracle")
    args = {"target": "lesion"}
    for _ in range(WARMUP):
        r = run_tool(TOOLS, "measure", args, ctx)
        assert not r.error, r.text
    times = [_timed(lambda: run_tool(TOOLS, "measure", args, ctx)) for _ in range(calls)]
    mask = case.study.structures["lesion"]
    return {"image_size": size, "mask_pixels": int(mask.sum()), "call": _percentiles(times)}


def bench_segment(size: int, prompts: int = 10) -> dict[str, Any]:
    from medgym.tools.segmenters import medsam_backend

    medsam_backend()  # load the weights outside the timing
    firsts, furthers = [], []
    for seed in range(3):
        case = PhantomSource(size=size, templates=["lesion_area"]).case(100 + seed)
        ctx = ToolContext(study=case.study, segmenter="medsam")
        box = case.answer_box or [size // 4, size // 4, size // 2, size // 2]
        for i in range(prompts):
            jitter = [box[0] - 2 - i % 3, box[1] - 2, box[2] + 2 + i % 3, box[3] + 2]
            t = time.perf_counter()
            r = run_tool(TOOLS, "segment", {"box": jitter}, ctx)
            (firsts if i == 0 else furthers).append(time.perf_counter() - t)
            assert not r.error, r.text
    return {"medsam_first_prompt": _percentiles(firsts), "medsam_further_prompts": _percentiles(furthers)}


def topic_mixtures(vectors: np.ndarray, n: int, seed: int = 0, noise: float = 0.03) -> np.ndarray:
    """``n`` unit vectors, each a random convex mix of three of ``vectors`` plus a little Gaussian noise."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(vectors), size=(n, 3))
    weights = rng.dirichlet(np.full(3, 0.5), size=n).astype(np.float32)
    out = np.einsum("nk,nkd->nd", weights, vectors[picks]).astype(np.float32)
    out += rng.normal(scale=noise, size=out.shape).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def bench_retrieval(passages: int, queries: int = 100) -> dict[str, Any]:
    from medgym.tools import retrieve as kb

    real = kb.load_passages()
    vectors = kb.embed([p["title"] + ". " + p["text"] for p in real])
    corpus = np.concatenate([vectors, topic_mixtures(vectors, max(0, passages - len(real)))])
    t = time.perf_counter()
    index = kb.make_index(corpus)
    build_s = time.perf_counter() - t
    flat = index if kb.kind_of(index) == "flat" else kb.make_index(corpus, "flat")
    questions = [
        QUESTION_TOPICS[i % len(QUESTION_TOPICS)].format(4 + i // len(QUESTION_TOPICS)) for i in range(queries)
    ]
    kb.embed(questions[:1])  # the encoder's first call allocates its buffers
    # Embed and search in turn, as the retrieve tool does; the exact search runs afterwards.
    encode, search, found = [], [], []
    for q in questions:
        t0 = time.perf_counter()
        qv = kb.embed([q])
        t1 = time.perf_counter()
        _, rows = index.search(qv, 5)
        search.append(time.perf_counter() - t1)
        encode.append(t1 - t0)
        found.append((qv, set(rows[0].tolist())))
    flat_search, hits = [], []
    for qv, rows in found:
        t = time.perf_counter()
        _, exact = flat.search(qv, 5)
        flat_search.append(time.perf_counter() - t)
        hits.append(len(rows & set(exact[0].tolist())) / 5)
    return {
        "index_size": int(index.ntotal),
        "real_passages": len(real),
        "index_kind": kb.kind_of(index),
        "build_s": round(build_s, 2),
        "encode": _percentiles(encode),
        "search": _percentiles(search),
        "flat_search": _percentiles(flat_search),
        "recall_at_5_vs_flat": round(float(np.mean(hits)), 4),
        "query": _percentiles([a + b for a, b in zip(encode, search, strict=True)]),
    }


def run_benchmarks(size: int = 512, passages: int = 100_000, steps: int = 200) -> dict[str, Any]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results: dict[str, Any] = {"image_size": size, "steps": steps, "cpus": os.cpu_count(), "load_avg_1min": load}
    with tempfile.TemporaryDirectory() as tmp:
        results.update(bench_env(size, steps, Path(tmp)))
    results["measure"] = bench_measure(size)
    results["segment"] = bench_segment(size)
    results["retrieval"] = bench_retrieval(passages)
    return results
