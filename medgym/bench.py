"""`medgym bench`: throughput and latency figures on this machine (reported, never asserted).

- env steps/s with a zoom turn and with a measure turn on phantoms of ``size`` pixels;
- the env + trace overhead: time of an env step (parse, tool, observation, trace record
  with PNG images) over the bare tool call on the same input;
- segment latency with LiteMedSAM: first prompt on a new image (image encoder) and
  further prompts on the same image (cached embedding);
- retrieval p50: query embedding + search over a flat index of ``passages`` vectors. The
  knowledge base's own passages are embedded for real; the rest of the index is filled
  with random unit vectors, since a flat index's search cost depends only on the number
  and dimension of vectors.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from medgym.environments.env import MedVQAEnv
from medgym.environments.sources import PhantomSource
from medgym.tools import TOOLS, ToolContext, run_tool


def _percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p95_ms": round(float(np.percentile(a, 95)), 2)}


def _case_with_lesion(size: int):
    source = PhantomSource(size=size, templates=["lesion_area"])
    return source.case(0)


def bench_env(size: int, steps: int, record_to: Path | None) -> dict[str, Any]:
    case = _case_with_lesion(size)
    turns = {
        "zoom": ("zoom", {"boxes": [[size // 4, size // 4, size // 2, size // 2]]}),
        "measure": ("measure", {"target": "lesion"}),
    }
    out: dict[str, Any] = {}
    for label, (name, arguments) in turns.items():
        text = "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"
        env = MedVQAEnv(source=PhantomSource(size=size), image_size=size, segmenter="threshold", record_to=record_to)
        env.reset(seed=0, options={"case": case})
        env_times = []
        for i in range(steps):
            if i and i % 50 == 0:  # keep episodes (and traces) of a realistic length
                env.reset(seed=i, options={"case": case})
            t = time.perf_counter()
            env.step(text)
            env_times.append(time.perf_counter() - t)
        env.close()
        ctx = ToolContext(study=case.study, segmenter="threshold")
        bare = []
        for _ in range(steps):
            t = time.perf_counter()
            run_tool(TOOLS, name, arguments, ctx)
            bare.append(time.perf_counter() - t)
        env_mean, bare_mean = float(np.mean(env_times)), float(np.mean(bare))
        out[label] = {
            "env_steps_per_s": round(1.0 / env_mean, 1),
            "bare_tool_calls_per_s": round(1.0 / bare_mean, 1),
            "overhead_ratio": round(env_mean / bare_mean, 3),
            "env_step": _percentiles(env_times),
            "bare_call": _percentiles(bare),
        }
    return out


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


def bench_retrieval(passages: int, queries: int = 100) -> dict[str, Any]:
    import faiss

    from medgym.tools import retrieve as kb

    real = kb.load_passages()
    vectors = kb.embed([p["title"] + ". " + p["text"] for p in real])
    rng = np.random.default_rng(0)
    filler = rng.normal(size=(max(0, passages - len(real)), vectors.shape[1])).astype(np.float32)
    filler /= np.linalg.norm(filler, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.concatenate([vectors, filler]))
    questions = [f"follow-up for a {4 + i % 10} mm lung nodule, case {i}" for i in range(queries)]
    times = []
    for q in questions:
        t = time.perf_counter()
        qv = kb.embed([q])
        index.search(qv, 5)
        times.append(time.perf_counter() - t)
    return {"index_size": int(index.ntotal), "real_passages": len(real), "query": _percentiles(times)}


def run_benchmarks(size: int = 512, passages: int = 100_000, steps: int = 200) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[str, Any] = {"image_size": size, "steps": steps}
        results["env_no_trace"] = bench_env(size, steps, None)
        results["env_with_trace"] = bench_env(size, steps, Path(tmp) / "traces.jsonl")
    results["segment"] = bench_segment(size)
    results["retrieval"] = bench_retrieval(passages)
    return results
