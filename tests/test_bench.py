"""The benchmark command runs end to end on a tiny budget and reports every figure (no timing asserted)."""

from __future__ import annotations

from medgym.bench import run_benchmarks


def test_bench_reports_every_figure():
    r = run_benchmarks(size=128, passages=300, steps=3)
    for mode in ("env_no_trace", "env_with_trace"):
        for tool in ("zoom", "measure"):
            fig = r[mode][tool]
            assert fig["env_steps_per_s"] > 0 and fig["overhead_ratio"] > 0
    assert r["segment"]["medsam_first_prompt"]["p50_ms"] > 0
    assert r["retrieval"]["index_size"] == 300
