"""`medgym train` runs: Trainer checkpoints, resume, metrics JSONL/CSV and plots; `medgym eval --policy embedded`."""

from __future__ import annotations

import json

import pytest


def test_train_refuses_bad_config_with_a_fix(capsys):
    from medgym.cli import main

    with pytest.raises(SystemExit, match="size must be one of"):
        main(["train", "sft", "--size", "huge"])
    with pytest.raises(SystemExit, match="multiple of num_generations"):
        main(["train", "grpo", "--per_device_train_batch_size", "3"])


def test_sft_run_checkpoints_resumes_and_plots(tiny_sft, tmp_path):
    from medgym.rl.config import SFTConfig
    from medgym.rl.runs import last_checkpoint, run_sft

    folder, _, _ = tiny_sft
    common = dict(
        output_dir=str(tmp_path / "run"),
        init_from=str(folder),
        train_seeds=[2000, 2],
        per_device_train_batch_size=1,
        save_steps=1,
        learning_rate=1e-3,
        disable_tqdm=True,
        brief_tools=True,
    )
    first = run_sft(SFTConfig(num_train_epochs=1, **common))
    run = tmp_path / "run"
    assert first["steps"] == 2 and first["resumed_from"] is None
    checkpoint = run / "checkpoint-1"
    assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "model.safetensors").exists()
    # Weights once per checkpoint, as safetensors: no pickled state dict beside them.
    assert not list(run.glob("checkpoint-*/pytorch_model*")) and not list(run.glob("checkpoint-*/*state.pt"))
    assert (run / "final" / "model.safetensors").exists() and (run / "sft.png").stat().st_size > 0
    assert last_checkpoint(run) == run / "checkpoint-2"
    second = run_sft(SFTConfig(num_train_epochs=2, **common), resume=True)
    assert second["resumed_from"] == str(run / "checkpoint-2")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the resumed run went on from step 2, not from 0
    assert all("loss" in r and "learning_rate" in r for r in rows)
    assert second["steps"] == 4 and (run / "metrics.csv").read_text().startswith("step,")
    meta = json.loads((run / "final" / "medgym.json").read_text())
    assert "sft" in json.dumps(meta["recipe"]) and meta["parameters"] > 0 and meta["tool_mode"] == "predicted"
    # trained on the brief tool list: the final and every resumable checkpoint record it, so each is prompted as trained
    from medgym.environments.contract import tool_schemas

    for folder in (run / "final", checkpoint, run / "checkpoint-4"):
        recorded = json.loads((folder / "medgym.json").read_text())
        assert recorded["tool_schemas"] == tool_schemas(brief=True) and recorded["system_prompt"], folder


def test_interrupted_checkpoint_save_is_skipped(tmp_path):
    from medgym.rl.runs import last_checkpoint

    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-4" / "model.safetensors").write_text("half")  # killed before trainer_state.json
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert not (tmp_path / "checkpoint-4").exists()
    assert last_checkpoint(tmp_path / "nowhere") is None


def test_eval_embedded_policy_offline(capsys):
    from medgym.cli import main
    from medgym.rl.policy_model import checkpoint_dir

    assert (checkpoint_dir() / "model.safetensors").exists(), "the shipped checkpoint is missing"
    main(["eval", "--policy", "embedded", "--n", "1", "--seed", "3", "--segmenter", "threshold", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 1 and summary["policy"].startswith("embedded")
    assert summary["tool_calls"] >= 1  # the shipped policy calls tools


def test_eval_unknown_checkpoint_is_a_clear_error(tmp_path):
    from medgym.cli import main

    with pytest.raises(SystemExit, match="no checkpoint at .*medgym train"):
        main(["eval", "--policy", f"embedded:{tmp_path}", "--n", "1"])


def test_grpo_run_checkpoints_resumes_and_plots(tiny_sft, tmp_path):
    from medgym.rl.config import GRPOConfig
    from medgym.rl.runs import run_grpo

    folder, _, _ = tiny_sft
    common = dict(
        output_dir=str(tmp_path / "grpo"),
        init_from=str(folder),
        train_seeds=[3000, 1],  # a visual-reasoning phantom: no knowledge-base index needed
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=128,
        save_steps=1,
        beta=0.02,
        disable_tqdm=True,
    )
    first = run_grpo(GRPOConfig(max_steps=1, **common))
    run = tmp_path / "grpo"
    assert first["steps"] == 1 and (run / "checkpoint-1" / "trainer_state.json").is_file()
    # a GRPO checkpoint is prompted as trained wherever it is evaluated: its start's tool list travels with it
    start_tools = json.loads((folder / "medgym.json").read_text())["tool_schemas"]
    step_meta = json.loads((run / "checkpoint-1" / "medgym.json").read_text())
    assert step_meta["stage"] == "grpo" and step_meta["step"] == 1 and step_meta["tool_schemas"] == start_tools
    second = run_grpo(GRPOConfig(max_steps=2, **common), resume=True)
    assert second["steps"] == 2 and second["resumed_from"] == str(run / "checkpoint-1")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "reward" in r]
    assert steps == [1, 2]  # the resumed run logged step 2 only
    assert any("kl" in r for r in rows) and (run / "grpo.png").stat().st_size > 0
    meta = json.loads((run / "final" / "medgym.json").read_text())
    assert meta["stage"] == "grpo" and "grpo" in meta["recipe"]


def test_grpo_runs_in_two_cpu_processes_under_accelerate_launch(tiny_sft, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without a GPU: two gloo ranks."""
    import os
    import subprocess
    import sys

    folder, _, _ = tiny_sft
    out = tmp_path / "grpo2"
    cmd = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"),
        *("--dynamo_backend", "no", "-m", "medgym.cli", "train", "grpo"),
        *("--init_from", str(folder), "--output_dir", str(out), "--train_seeds", "2000", "4"),
        *("--stages", "recognition", "measurement"),  # no retrieve calls: no knowledge-base index to build
        *("--max_steps", "1", "--save_steps", "0", "--per_device_train_batch_size", "2", "--num_generations", "2"),
        *("--max_completion_length", "96", "--max_tool_calling_iterations", "1", "--quiet"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"processes": 2' in done.stdout and '"process": 1' in done.stdout  # both ranks ran; rank 0 wrote
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1]  # one writer: the step is logged once
    assert (out / "final" / "model.safetensors").exists()


def test_ship_checkpoint_takes_the_model_files_and_the_runs_record(tmp_path):
    """An intermediate GRPO checkpoint ships without trainer state, as float16, with its run's recipe and curve."""
    import importlib.util
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    spec = importlib.util.spec_from_file_location(
        "ship_checkpoint", Path(__file__).resolve().parents[2] / "scripts" / "ship_checkpoint.py"
    )
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)

    step, final = tmp_path / "run" / "checkpoint-5", tmp_path / "run" / "final"
    for folder in (step, final):
        folder.mkdir(parents=True)
    save_file({"w": torch.ones(2, 3)}, step / "model.safetensors")
    (step / "config.json").write_text("{}")
    (step / "tokenizer.json").write_text("{}")
    (step / "trainer_state.json").write_text('{"global_step": 5}')
    (step / "medgym.json").write_text(json.dumps({"stage": "grpo", "step": 5, "tool_schemas": [{"name": "zoom"}]}))
    curve = [{"step": 0, "heldout/accuracy": 0.3}, {"step": 5, "heldout/accuracy": 0.4}]
    (final / "medgym.json").write_text(json.dumps({"recipe": {"grpo": {"max_steps": 30}}, "heldout_curve": curve}))
    into = tmp_path / "shipped"
    (into / "embedded").mkdir(parents=True)
    (into / "embedded" / "stale.bin").write_text("from the previous policy")

    ship.main([str(step), "embedded", "--model-id", "embedded", "--into", str(into), "--run-meta", str(final)])
    shipped = into / "embedded"
    assert sorted(f.name for f in shipped.iterdir()) == [
        "config.json",
        "medgym.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert load_file(shipped / "model.safetensors")["w"].dtype == torch.float16
    meta = json.loads((shipped / "medgym.json").read_text())
    assert meta["step"] == 5 and meta["heldout_curve"] == curve and meta["recipe"]["grpo"]["max_steps"] == 30
    assert meta["tool_schemas"] == [{"name": "zoom"}] and meta["model_id"] == "embedded"
    with pytest.raises(SystemExit, match="not a medgym checkpoint"):
        ship.main([str(tmp_path / "run"), "embedded", "--model-id", "embedded", "--into", str(into)])
