"""Crash safety of eval traces: ``medgym eval`` killed with SIGKILL while it writes traces.

Every episode written before the kill loads and verifies (content hash, images on disk); a torn
last line, if the kill cut one, is reported in ``read_traces(...).problems``, not raised; and
``medgym replay --verify`` replays the intact episodes. A kill rarely lands inside the one
``write`` of a line, so a copy of the file truncated mid-line checks the torn case every run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medgym.cli import main
from medgym.traces import ImageStore, TraceEpisode, TraceHeader, TraceWriter, read_traces
from medgym.traces.replay import ImageChecker, verify_episode

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
EPISODES_BEFORE_KILL = 4
N = 200  # far more than get done before the kill
# Cases 10..20 need no retrieve call from the predicted-mode expert: the kill (and the replay) comes
# before anything loads the sentence encoder, which takes most of a minute on a busy machine.
FIRST_SEED = 10


def complete_lines(path: Path) -> int:
    if not path.exists():
        return 0
    return path.read_bytes().count(b"\n")


def eval_killed_mid_run(out: Path, timeout: float = 240) -> subprocess.CompletedProcess | int:
    """Run ``medgym eval`` on N cases and SIGKILL it once a few episodes are on disk; its return code."""
    cmd = [sys.executable, "-m", "medgym.cli", "eval", "--policy", "expert", "--n", str(N)]
    cmd += ["--segmenter", "threshold", "--seed", str(FIRST_SEED), "--out", str(out), "--json"]
    log = (out.parent / "killed.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    traces = out / "traces.jsonl"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if complete_lines(traces) >= EPISODES_BEFORE_KILL:
                proc.kill()  # SIGKILL: no handler, no atexit, no flush
                break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -9, f"eval was not killed mid-run:\n{(out.parent / 'killed.log').read_text()[-3000:]}"
    return proc.returncode


def replay_json(path: Path, capsys) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["replay", str(path), "--verify", "--json"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def assert_intact_episodes(path: Path, torn_allowed: bool) -> int:
    """Each complete line is an episode that verifies; at most a torn last line is reported. Returns the count."""
    trace = read_traces(path)
    lines = path.read_bytes().split(b"\n")
    complete = len(lines) - 1
    torn_tail = lines[-1] != b""
    assert len(trace.episodes) == complete >= 1
    assert trace.lines == list(range(1, complete + 1))
    checker = ImageChecker(ImageStore(path.parent / "images", create=False))
    for episode in trace.episodes:
        assert verify_episode(episode, checker) == [], episode.header.case_id
    if torn_tail:
        assert torn_allowed
        (problem,) = trace.problems
        assert f"line {complete + 1}" in problem and "torn last line" in problem
    else:
        assert trace.problems == []
    return complete


def test_eval_killed_with_sigkill_leaves_every_written_episode_intact(tmp_path, capsys, trace_copy):
    out = tmp_path / "eval"
    eval_killed_mid_run(out)
    path = out / "traces.jsonl"
    n = assert_intact_episodes(path, torn_allowed=True)
    assert EPISODES_BEFORE_KILL <= n < N

    # Replay re-runs every intact episode's tool calls and verifies it.
    code, report = replay_json(path, capsys)
    assert report["episodes"] == n and report["tool_calls"] > 0
    assert report["diffs"] == [] and report["episode_problems"] == []
    torn = path.read_bytes()[-1:] != b"\n"
    assert len(report["file_problems"]) == int(torn) and code == int(torn)

    # The same file cut in the middle of its last line, as a kill inside the write would leave it.
    whole = path.read_bytes()
    if torn:
        whole = whole[: whole.rindex(b"\n") + 1]
    last_start = whole.rindex(b"\n", 0, len(whole) - 1) + 1
    cut = trace_copy(path, tmp_path / "torn", lines=[])
    cut.write_bytes(whole[: last_start + (len(whole) - last_start) // 2])
    assert assert_intact_episodes(cut, torn_allowed=True) == whole.count(b"\n") - 1
    code, report = replay_json(cut, capsys)
    assert code == 1 and report["episodes"] == whole.count(b"\n") - 1
    assert report["diffs"] == [] and report["episode_problems"] == []
    assert len(report["file_problems"]) == 1 and "torn last line" in report["file_problems"][0]


def small_episode(i: int) -> TraceEpisode:
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
    return TraceEpisode(header=header, final_answer="\u00e9\u00e9\u00e9 \U0001f600")


@pytest.mark.parametrize("cut", [2, 3, 5, 40])
def test_a_line_cut_anywhere_is_a_reported_problem_not_an_error(tmp_path, cut):
    """Cut inside a multi-byte character or mid-field: one torn line, reported; the episodes before it load."""
    path = tmp_path / "traces.jsonl"
    with TraceWriter(path) as writer:
        sealed = [writer.write(small_episode(i)) for i in range(3)]
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    trace = read_traces(path)
    assert trace.episodes == sealed[:2]
    (problem,) = trace.problems
    assert problem.startswith("line 3: not a valid episode (torn last line")


def test_a_line_that_lost_only_its_newline_is_still_an_episode(tmp_path):
    path = tmp_path / "traces.jsonl"
    with TraceWriter(path) as writer:
        sealed = [writer.write(small_episode(i)) for i in range(2)]
    path.write_bytes(path.read_bytes()[:-1])
    trace = read_traces(path)
    assert trace.episodes == sealed and trace.problems == []


def test_writing_after_a_torn_line_keeps_the_new_episode(tmp_path):
    """A run resumed into the folder of a killed one (same --out) must not lose its first episode."""
    path = tmp_path / "traces.jsonl"
    with TraceWriter(path) as writer:
        writer.write(small_episode(0))
        writer.write(small_episode(1))
    path.write_bytes(path.read_bytes()[:-40])  # killed inside the second line
    with TraceWriter(path) as writer:
        new = writer.write(small_episode(2))
    trace = read_traces(path)
    assert new in trace.episodes and len(trace.problems) == 1
