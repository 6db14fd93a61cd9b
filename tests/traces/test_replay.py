"""Replay and verify: expert traces reproduce, an edited number is caught and named, torn files still work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from medgym.cli import main
from medgym.evaluation.replay import replay_file
from medgym.traces import read_traces
from medgym.traces.replay import ERR_HASH, diff_values, verify_episode
from medgym.traces.schema import SCHEMA_VERSION

V1_FIXTURE = Path(__file__).parent / "fixtures" / "v1_traces.jsonl"


def test_100_expert_episodes_replay_and_verify_clean(expert_traces):
    report = replay_file(expert_traces, verify=True)
    assert report.ok, "\n".join(report.lines()[:20])
    assert len(report.episodes) == 100
    assert not report.file_problems
    calls = sum(e.calls for e in report.episodes)
    recorded = sum(len(s.calls) for ep in read_traces(expert_traces).episodes for s in ep.steps)
    assert calls == recorded >= 100  # every recorded call was re-run
    assert "everything reproduces and verifies" in report.summary()


def test_the_header_records_what_replay_needs(expert_traces):
    header = read_traces(expert_traces).episodes[0].header
    assert header.schema_version == SCHEMA_VERSION
    assert header.source == "phantom" and header.source_spec == "phantom" and header.seed is not None
    assert header.segmenter == "threshold"
    assert header.study_hash and header.prompt_hash and header.model_id == "expert"
    assert set(header.tool_versions) >= {"segment", "measure", "zoom"}


def _tamper(line: str) -> tuple[str, int, str, float]:
    """Change one number in the data of the first measure call: (new line, step, key, old value)."""
    ep = json.loads(line)
    for step in ep["steps"]:
        for call in step["calls"]:
            if call["name"] == "measure":
                old = call["data"]["longest_diameter_mm"]
                call["data"]["longest_diameter_mm"] = round(old + 1.5, 3)
                return json.dumps(ep) + "\n", step["index"], "longest_diameter_mm", old
    raise AssertionError("no measure call in this episode")


def test_an_edited_tool_result_fails_verify_and_names_the_step(expert_traces, tmp_path, capsys, trace_copy):
    lines = expert_traces.read_text().splitlines(keepends=True)[:5]
    k = next(i for i, line in enumerate(lines) if '"name":"measure"' in line)
    lines[k], step, key, old = _tamper(lines[k])
    path = trace_copy(expert_traces, tmp_path / "edited", lines)

    assert main(["replay", str(path), "--verify"]) == 1
    out = capsys.readouterr().out
    case_id = json.loads(lines[k])["header"]["case_id"]
    assert f"episode {k + 1} (line {k + 1}, case {case_id}): {ERR_HASH}" in out
    named = [ln for ln in out.splitlines() if f"step {step} call 1 measure" in ln]
    assert len(named) == 1, out
    assert f"data.{key}: recorded {round(old + 1.5, 3)}, replayed {old}" in named[0]
    assert out.strip().splitlines()[-1].startswith("FAIL:")
    # Only that episode differs; the others are named nowhere.
    assert sum("episode" in ln and "differ" not in ln for ln in out.splitlines()) == 2


def test_a_torn_file_is_reported_and_earlier_episodes_replay_and_score(expert_traces, tmp_path, capsys, trace_copy):
    data = "".join(expert_traces.read_text().splitlines(keepends=True)[:6])
    path = trace_copy(expert_traces, tmp_path / "torn", [data[: len(data) - 300]])  # killed mid-write

    report = replay_file(path)
    assert len(report.episodes) == 5 and all(e.ok for e in report.episodes)
    assert len(report.file_problems) == 1 and "torn last line" in report.file_problems[0]
    assert report.ok  # plain replay: the five complete episodes reproduce
    assert not replay_file(path, verify=True).ok  # verification also requires an intact file

    assert main(["score", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    scores = json.loads(captured.out)
    assert scores["episodes"] == 5 and scores["accuracy"] == 1.0
    assert "torn last line" in captured.err


def test_a_rebuilt_case_that_differs_is_reported(expert_traces, tmp_path, trace_copy):
    ep = json.loads(expert_traces.read_text().splitlines()[0])
    ep["header"]["source_config"] = {"size": 128}  # another phantom size: another case for the seed
    path = trace_copy(expert_traces, tmp_path / "other", [json.dumps(ep) + "\n"])
    report = replay_file(path)
    assert not report.ok
    assert any("rebuilt case differs" in p for p in report.episodes[0].problems)


def test_error_results_reproduce_too(mixed_traces):
    report = replay_file(mixed_traces, verify=True)
    assert report.ok, "\n".join(report.lines())
    errors = sum(c.error for ep in read_traces(mixed_traces).episodes for s in ep.steps for c in s.calls)
    assert errors == 4


def test_the_frozen_v1_file_loads_and_its_hashes_verify(tmp_path):
    traces = read_traces(V1_FIXTURE)
    assert not traces.problems and len(traces.episodes) == 3
    for ep in traces.episodes:
        assert ep.header.schema_version == 1
        assert ep.header.segmenter is None and ep.header.unit is None  # fields added later load as defaults
        assert verify_episode(ep, images=None) == []  # the writer's hash still matches
    edited = tmp_path / "t.jsonl"
    edited.write_text(V1_FIXTURE.read_text().replace('"answer":"no"', '"answer":"yes"', 1))
    assert verify_episode(read_traces(edited).episodes[0], images=None) == [ERR_HASH]


def test_a_newer_schema_is_refused_with_a_clear_message(tmp_path):
    ep = json.loads(V1_FIXTURE.read_text().splitlines()[0])
    ep["header"]["schema_version"] = SCHEMA_VERSION + 1
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ep) + "\n")
    problems = read_traces(path).problems
    assert len(problems) == 1 and "newer than this medgym understands" in problems[0]


def test_numbers_compare_within_tolerance():
    assert diff_values({"a": 1.0}, {"a": 1.0 + 1e-9}) == []
    assert diff_values({"a": 1.0}, {"a": 1.001}) == ["data.a: recorded 1.0, replayed 1.001"]
    assert diff_values({"a": 1.0}, {"a": 1.001}, rtol=0.01) == []
    assert diff_values({"a": True}, {"a": 1}) == ["data.a: recorded True, replayed 1"]


def test_traces_modules_do_not_import_tools_or_environments():
    code = (
        "import sys, medgym.traces.replay, medgym.traces.score, medgym.traces.report, "
        "medgym.traces.export, medgym.traces.store, medgym.traces.schema\n"
        "above = ('medgym.tools', 'medgym.environments', 'medgym.agents', 'medgym.rl', 'medgym.evaluation')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(above))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    # Not even lazily, inside a function: the source of traces names nothing above it.
    import re
    from pathlib import Path

    import medgym.traces

    pattern = re.compile(r"(from|import) medgym\.(tools|environments|agents|rl|evaluation)\b")
    for path in Path(medgym.traces.__file__).parent.glob("*.py"):
        assert not pattern.search(path.read_text()), path


def test_a_tool_that_crashes_on_replay_is_named_and_the_rest_goes_on(expert_traces, tmp_path, monkeypatch, trace_copy):
    import dataclasses

    from medgym.tools import TOOLS

    def boom(args, ctx):
        raise RuntimeError("simulated bug")

    monkeypatch.setitem(TOOLS, "measure", dataclasses.replace(TOOLS["measure"], fn=boom))
    lines = expert_traces.read_text().splitlines(keepends=True)[:3]
    report = replay_file(trace_copy(expert_traces, tmp_path / "t", lines))
    measures = sum(
        c.name == "measure" for ep in read_traces(expert_traces).episodes[:3] for s in ep.steps for c in s.calls
    )
    crashed = [d for d in report.diffs if d.what == ["the tool raised RuntimeError: simulated bug"]]
    assert len(report.episodes) == 3 and len(crashed) == measures > 0
    assert all(d.tool == "measure" for d in crashed)


def test_predicted_mode_traces_replay_clean(tmp_path):
    """Env episodes in predicted mode (real segmentations of annotator boxes) replay and verify clean."""
    from medgym.environments.evaluate import evaluate
    from medgym.environments.policies import ExpertPolicy

    evaluate(ExpertPolicy(), n=12, seed=300, out=tmp_path, segmenter="threshold")
    report = replay_file(tmp_path / "traces.jsonl", verify=True)
    assert report.ok, report.lines()
    assert len(report.episodes) == 12 and sum(e.calls for e in report.episodes) >= 24


def test_a_chat_trace_replays_clean(tmp_path):
    """medgym chat --case-seed 5 --backend expert --out DIR writes a trace that replay --verify accepts."""
    from medgym.cli import main

    assert (
        main(["chat", "--case-seed", "5", "--backend", "expert", "--segmenter", "threshold", "--out", str(tmp_path)])
        == 0
    )
    traces = tmp_path / "traces.jsonl"
    report = replay_file(traces, verify=True)
    assert report.ok and len(report.episodes) == 1 and report.episodes[0].calls >= 1, report.lines()
    assert main(["replay", str(traces), "--verify"]) == 0


def test_replay_runs_tools_in_the_recorded_mode(expert_traces):
    """Oracle traces name structures; replayed in their recorded mode, they reproduce (not predicted-mode errors)."""
    from medgym.traces import read_traces

    first = read_traces(expert_traces).episodes[0]
    assert first.header.tool_mode == "oracle"
    report = replay_file(expert_traces, limit=3)
    assert report.ok, report.lines()
