"""Crash safety: `medgym train` killed with SIGKILL after a checkpoint, then rerun with --resume.

The resumed run must go on from the newest complete checkpoint: the same global step count at
the end, every step logged exactly once in metrics.jsonl, and the steps the killed run had done
after its checkpoint done again with the same losses (the curve continues, it does not restart).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}


def _rows(run: Path, key: str) -> list[dict]:
    """The metrics rows holding ``key``; a line the kill tore in half is skipped."""
    rows = []
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if key in r]


def _complete_checkpoints(run: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run.glob("checkpoint-*/trainer_state.json"))


def _kill_after_checkpoint(cmd: list[str], run: Path, key: str, timeout: float = 120) -> tuple[int, list[dict]]:
    """Start ``cmd``, SIGKILL it once a checkpoint is complete and a later step is logged; (checkpoint, rows)."""
    log = (run.parent / "killed.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = _complete_checkpoints(run)
            if done and any(r["step"] > done[-1] for r in _rows(run, key)):
                proc.kill()  # SIGKILL: no handler, no cleanup
                break
            time.sleep(0.05)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -9, f"the run was not killed mid-way:\n{(run.parent / 'killed.log').read_text()[-3000:]}"
    return _complete_checkpoints(run)[-1], _rows(run, key)


def _resume(cmd: list[str], run: Path) -> str:
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=240, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _assert_continues(run: Path, keys: tuple[str, ...], checkpoint: int, before: list[dict], max_steps: int) -> None:
    after = _rows(run, keys[0])
    assert [r["step"] for r in after] == list(range(1, max_steps + 1))  # none missing, none twice
    state = json.loads((run / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == max_steps
    redone = [r for r in before if r["step"] > checkpoint]
    assert redone, "the killed run logged no step after its checkpoint"
    for row in redone:  # the same steps again, from the same weights, optimizer, data and random state
        again = after[row["step"] - 1]
        for key in keys:
            assert math.isclose(again[key], row[key], rel_tol=1e-3, abs_tol=1e-6), (key, row, again)
    kept = [{k: r[k] for k in ("step", *keys)} for r in before if r["step"] <= checkpoint]
    assert kept == [{k: r[k] for k in ("step", *keys)} for r in after[:checkpoint]]  # the curve up to it is kept


@pytest.mark.timeout(300)
def test_sft_killed_after_a_checkpoint_resumes_where_it_stopped(tiny_init, tiny_tool_mode, tmp_path):
    run = tmp_path / "sft"
    max_steps = 8
    cmd = [
        *(sys.executable, "-m", "medgym.cli", "train", "sft", "--init_from", str(tiny_init)),
        *("--output_dir", str(run), "--train_seeds", "2000", "8", "--per_device_train_batch_size", "2"),
        *("--max_steps", str(max_steps), "--save_steps", "3", "--learning_rate", "5e-3"),
        *("--tool_mode", tiny_tool_mode, "--quiet"),
    ]
    checkpoint, before = _kill_after_checkpoint(cmd, run, "loss")
    assert checkpoint < max_steps
    out = _resume(cmd, run)
    assert f'"resumed_from": "{run / f"checkpoint-{checkpoint}"}"' in out
    _assert_continues(run, ("loss", "grad_norm", "learning_rate"), checkpoint, before, max_steps)
    losses = [r["loss"] for r in _rows(run, "loss")]
    assert losses[-1] < losses[0]  # the resumed run kept learning instead of starting over


@pytest.mark.timeout(300)
def test_grpo_killed_after_a_checkpoint_resumes_where_it_stopped(tiny_sft, tiny_tool_mode, tmp_path):
    folder, _, _ = tiny_sft
    run = tmp_path / "grpo"
    max_steps = 6
    cmd = [
        *(sys.executable, "-m", "medgym.cli", "train", "grpo", "--init_from", str(folder)),
        *("--output_dir", str(run), "--train_seeds", "2000", "4", "--stages", "recognition", "measurement"),
        *("--max_steps", str(max_steps), "--save_steps", "2", "--per_device_train_batch_size", "2"),
        *("--num_generations", "2", "--max_completion_length", "128", "--max_tool_calling_iterations", "3"),
        *("--learning_rate", "1e-4", "--tool_mode", tiny_tool_mode, "--quiet"),
    ]
    checkpoint, before = _kill_after_checkpoint(cmd, run, "reward")
    assert checkpoint < max_steps
    out = _resume(cmd, run)
    assert f'"resumed_from": "{run / f"checkpoint-{checkpoint}"}"' in out
    _assert_continues(run, ("reward", "loss", "completions/mean_length"), checkpoint, before, max_steps)
