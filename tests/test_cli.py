"""The medgym command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from medgym.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medgym.cli", *args], capture_output=True, text=True, timeout=600)


def test_check_exits_zero_and_reports_every_tool():
    r = run("check")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("zoom", "window", "segment", "measure", "retrieve", "env:medgym/MedVQA-v0"):
        assert name in r.stdout
    assert "0 failed" in r.stdout


def test_generate_writes_cases(tmp_path, capsys):
    assert main(["generate", "--source", "phantom", "--n", "3", "--seed", "5", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("phantom-*.json"))) == 3 and len(list(tmp_path.glob("*.npz"))) == 3
    assert len((tmp_path / "index.jsonl").read_text().splitlines()) == 3


def test_eval_json_summary_and_traces(tmp_path, capsys):
    code = main(
        [
            "eval",
            "--policy",
            "expert",
            "--source",
            "phantom",
            "--n",
            "6",
            "--seed",
            "3",
            "--out",
            str(tmp_path),
            "--segmenter",
            "threshold",
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("n", "accuracy", "by_stage", "mean_iou", "tool_calls"):
        assert key in summary
    assert summary["n"] == 6 and summary["accuracy"] == 1.0
    assert len((tmp_path / "traces.jsonl").read_text().splitlines()) == 6


def test_bad_arguments_exit_with_a_message():
    r = run("eval", "--n", "0")
    assert r.returncode == 2 and "positive" in r.stderr
    r = run("eval", "--policy", "oracle", "--n", "1")
    assert r.returncode != 0 and "unknown policy" in r.stderr.lower()
