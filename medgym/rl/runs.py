"""Whole training runs behind ``medgym train``: data, model, training, final model, metrics, plots, eval."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from medgym.rl.config import GRPOConfigMedgym, SFTConfig, to_dict
from medgym.rl.metrics import GRPO_PANELS, SFT_PANELS, MetricsLog

log = logging.getLogger(__name__)


def resolve_checkpoint(spec: str | Path) -> Path:
    """``embedded`` names the shipped checkpoint; anything else is a folder (a run folder means its ``final``)."""
    from medgym.rl.policy_model import checkpoint_dir

    if str(spec) == "embedded":
        return checkpoint_dir()
    path = Path(spec)
    if not (path / "config.json").exists() and (path / "final" / "config.json").exists():
        return path / "final"
    return path


def evaluate_checkpoint(path: str | Path, source: str, seeds: list[int], segmenter: str, progress: bool = False):
    """Accuracy by stage, IoU and tool use of a checkpoint on cases ``seeds[0] .. seeds[0] + seeds[1] - 1``."""
    from medgym.environments.evaluate import evaluate
    from medgym.rl.policy_model import EmbeddedPolicy

    return evaluate(
        EmbeddedPolicy(path), source=source, n=seeds[1], seed=seeds[0], progress=progress, segmenter=segmenter
    )


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name[11:].isdigit() else -1)
    return found[-1] if found else None


def run_sft(cfg: SFTConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    from medgym.environments.sources import CaseRange, make_source
    from medgym.rl.policy_model import build_model, build_processor, load, n_parameters, save
    from medgym.rl.sft import train_sft

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    metrics = MetricsLog(out)
    latest = _latest_checkpoint(out) if resume else None
    t0 = time.perf_counter()
    start_recipe: dict[str, Any] = {}
    if latest is not None:
        model, processor = load(latest)  # tokenizer and weights as saved; the optimizer state follows in train_sft
    elif cfg.init_from:
        start = resolve_checkpoint(cfg.init_from)
        model, processor = load(start)
        if (start / "medgym.json").exists():
            start_recipe = json.loads((start / "medgym.json").read_text()).get("recipe", {})
    else:
        processor = build_processor(cfg.tokenizer_cases, cfg.vocab_size)
        model = build_model(processor, cfg.size, cfg.seed)
    source = make_source(cfg.source)
    first, count = cfg.train_seeds
    result = train_sft(
        model,
        processor,
        CaseRange(source, first, count),
        epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        grad_accum=cfg.grad_accum,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        with_tools=cfg.tools,
        out_dir=out,
        save_steps=cfg.save_steps,
        resume=latest is not None,
        log_fn=metrics.append,
        progress=progress,
    )
    meta = {
        "model_id": f"embedded-{cfg.size}-sft" + ("" if cfg.tools else "-notools"),
        "stage": "sft",
        "tools": cfg.tools,
        "parameters": n_parameters(model),
        "recipe": {**start_recipe, f"sft{len(start_recipe) + 1 if start_recipe else ''}": to_dict(cfg)},
        "train_seconds": round(time.perf_counter() - t0, 1),
        "final_loss": result.final_loss,
    }
    final = save(model, processor, out / "final", meta)
    summary: dict[str, Any] = {"final": str(final), "steps": result.steps, "final_loss": result.final_loss}
    summary.update(_finish(metrics, SFT_PANELS, "sft.png"))
    if cfg.eval_seeds[1]:
        summary["eval"] = evaluate_checkpoint(final, cfg.source, cfg.eval_seeds, cfg.segmenter, progress)
        (out / "eval.json").write_text(json.dumps(summary["eval"], indent=1))
    return summary


def run_grpo(cfg: GRPOConfigMedgym, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    from transformers import TrainerCallback

    from medgym.rl.grpo import build_dataset, make_trainer
    from medgym.rl.policy_model import load, n_parameters, save

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    metrics = MetricsLog(out)
    start = resolve_checkpoint(cfg.init_from)
    model, processor = load(start)
    model.train()
    start_meta_file = start / "medgym.json"
    start_meta = json.loads(start_meta_file.read_text()) if start_meta_file.exists() else {}
    first, count = cfg.train_seeds
    dataset = build_dataset(list(range(first, first + count)), cfg.source, cfg.stages or None)

    class _Log(TrainerCallback):
        """Logged metrics to metrics.jsonl, with the wall time of the step just finished."""

        step_started = step_seconds = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.step_started is not None:
                self.step_seconds = time.perf_counter() - self.step_started

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:  # one writer under `accelerate launch`
                timing = {"step_seconds": self.step_seconds} if self.step_seconds is not None else {}
                metrics.append({"step": state.global_step, **logs, **timing})

    trainer = make_trainer(model, processor, dataset, cfg.trl_args(disable_tqdm=not progress), cfg.segmenter, [_Log()])
    t0 = time.perf_counter()
    latest = _latest_checkpoint(out) if resume else None
    trainer.train(resume_from_checkpoint=str(latest) if latest is not None else None)
    if not trainer.accelerator.is_main_process:
        return {"steps": trainer.state.global_step, "process": trainer.accelerator.process_index}
    recipe = dict(start_meta.get("recipe", {}))
    recipe["grpo"] = to_dict(cfg)
    meta = {
        "model_id": str(start_meta.get("model_id", "embedded")).replace("-sft", "") + "-grpo",
        "stage": "grpo",
        "parameters": n_parameters(model),
        "recipe": recipe,
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    final = save(trainer.model, processor, out / "final", meta)
    summary: dict[str, Any] = {
        "final": str(final),
        "steps": trainer.state.global_step,
        "processes": trainer.accelerator.num_processes,
    }
    summary.update(_finish(metrics, GRPO_PANELS, "grpo.png"))
    if cfg.eval_seeds[1]:
        summary["eval"] = evaluate_checkpoint(final, cfg.source, cfg.eval_seeds, cfg.segmenter, progress)
        (out / "eval.json").write_text(json.dumps(summary["eval"], indent=1))
    return summary


def _finish(metrics: MetricsLog, panels, png: str) -> dict[str, Any]:
    csv_path = metrics.write_csv() if metrics.rows() else None
    plot = metrics.plot(panels, png)
    return {
        "metrics": str(metrics.path),
        "csv": str(csv_path) if csv_path else None,
        "plot": str(plot) if plot else None,
    }
