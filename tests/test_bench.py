"""The benchmark command runs end to end on a tiny budget and reports every figure (no timing asserted)."""

from __future__ import annotations

import numpy as np

from medgym.bench import run_benchmarks, topic_mixtures


def test_bench_reports_every_figure():
    r = run_benchmarks(size=128, passages=300, steps=3)
    for mode, tools in (
        ("env_no_trace", ("zoom", "measure")),
        ("env_with_trace", ("zoom", "measure", "zoom_new_images")),
    ):
        for tool in tools:
            fig = r[mode][tool]
            assert fig["env_steps_per_s"] > 0 and fig["overhead_ratio"] > 0
            assert fig["bare_call"]["p50_ms"] > 0 and fig["env_step"]["p50_ms"] > 0
    assert r["measure"]["call"]["p50_ms"] > 0 and r["measure"]["mask_pixels"] > 0
    assert r["segment"]["medsam_first_prompt"]["p50_ms"] > 0
    ret = r["retrieval"]
    assert ret["index_size"] == 300 and ret["index_kind"] == "flat"  # a small corpus stays exact
    assert ret["recall_at_5_vs_flat"] == 1.0
    assert ret["encode"]["p50_ms"] > 0 and ret["search"]["p50_ms"] > 0 and ret["flat_search"]["p50_ms"] > 0


def test_topic_mixtures_are_unit_vectors_near_the_passages():
    rng = np.random.default_rng(0)
    passages = rng.normal(size=(20, 32)).astype(np.float32)
    passages /= np.linalg.norm(passages, axis=1, keepdims=True)
    mixed = topic_mixtures(passages, 500)
    assert mixed.shape == (500, 32) and mixed.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1.0, atol=1e-5)
    assert np.median((mixed @ passages.T).max(axis=1)) > 0.6  # each leans towards a passage it mixes
