"""Whole training runs behind ``medgym train``: data, model, training, final model, metrics, plots, eval.

Checkpoints, their ``trainer_state.json`` and ``resume`` are the ``transformers.Trainer``'s; the
final model is written once more as ``final/`` with its ``medgym.json`` (what the embedded
backend loads).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from medgym.environments.contract import tool_schemas
from medgym.rl.config import GRPOConfig, SFTConfig, recipe
from medgym.rl.curve import CollapseGuard, HeldOutCurve
from medgym.rl.metrics import GRPO_PANELS, SFT_PANELS, MetricsCallback, MetricsLog

log = logging.getLogger(__name__)


def resolve_checkpoint(spec: str | Path) -> Path:
    """``embedded`` and ``embedded-sft`` name the shipped checkpoints; anything else is a folder (a run folder means its ``final``)."""
    from medgym.agents.backends import SHIPPED_CHECKPOINTS, embedded_path

    if str(spec) in SHIPPED_CHECKPOINTS:
        return embedded_path(str(spec))
    path = Path(spec)
    if not (path / "config.json").exists() and (path / "final" / "config.json").exists():
        return path / "final"
    return path


def last_checkpoint(out: str | Path) -> Path | None:
    """The newest complete ``checkpoint-N`` of a run (``transformers``' ``get_last_checkpoint``), or None.

    The Trainer writes a checkpoint's ``trainer_state.json`` last, so a folder without a readable
    one is a save that a crash cut short: it is removed (the resumed run writes it again when it
    gets there) and the previous checkpoint is used.
    """
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(out)
    while out.is_dir() and (found := get_last_checkpoint(str(out))) is not None:
        state = Path(found) / "trainer_state.json"
        try:
            json.loads(state.read_text())
            return Path(found)
        except (OSError, ValueError):
            log.warning("removing %s: its save was interrupted (no readable trainer_state.json)", found)
            shutil.rmtree(found, ignore_errors=True)  # under `accelerate launch` every rank may get here
    return None


def evaluate_checkpoint(path: str | Path, cfg: SFTConfig | GRPOConfig, progress: bool = False) -> dict[str, Any]:
    """Accuracy by stage, IoU and tool use of a checkpoint on the config's held-out ``eval_seeds`` (its tool mode)."""
    from medgym.agents.backends import EmbeddedBackend
    from medgym.environments.evaluate import evaluate

    first, count = cfg.eval_seeds
    policy = EmbeddedBackend(path)
    return evaluate(
        policy, cfg.source, count, first, progress=progress, tool_mode=cfg.tool_mode, segmenter=cfg.segmenter
    )


def _start(cfg: SFTConfig | GRPOConfig, resume: bool) -> tuple[Path, MetricsLog, Path | None, dict[str, Any]]:
    """(output folder, metrics, checkpoint to resume from, recipe); the recipe before any trainer exists."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    latest = last_checkpoint(out) if resume else None
    if resume and latest is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out)
    return out, MetricsLog(out), latest, recipe(cfg)


def _meta(start: Path | None) -> dict[str, Any]:
    meta_file = start / "medgym.json" if start is not None else None
    return json.loads(meta_file.read_text()) if meta_file is not None and meta_file.exists() else {}


class CheckpointMeta(TrainerCallback):
    """Writes ``medgym.json`` (the system text and tool list trained with) into each resumable checkpoint, so an
    intermediate one is prompted as trained wherever it is evaluated or continued (``init_from``)."""

    def __init__(self, meta: dict[str, Any], tool_mode: str, tools: list[dict[str, Any]] | None):
        self.meta, self.tool_mode, self.tools = meta, tool_mode, tools

    def on_save(self, args, state, control, **kwargs):
        from medgym.rl.policy_model import write_meta

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_meta(folder, {**self.meta, "step": state.global_step}, self.tool_mode, self.tools)


def run_sft(cfg: SFTConfig, resume: bool = False) -> dict[str, Any]:
    """SFT as configured; with ``resume``, from the newest checkpoint in ``output_dir`` (same steps, same curve)."""
    from medgym.environments.sources import CaseRange, make_source
    from medgym.rl.policy_model import build_model, build_processor, load, n_parameters, save
    from medgym.rl.sft import train_sft

    out, metrics, latest, cfg_recipe = _start(cfg, resume)
    t0 = time.perf_counter()
    start = resolve_checkpoint(cfg.init_from) if cfg.init_from else None
    if latest is not None:
        model, processor = load(latest)  # its tokenizer: a fresh run's was trained by that run
    elif start is not None:
        model, processor = load(start)
    else:
        processor = build_processor(cfg.tokenizer_cases, cfg.vocab_size)
        model = build_model(processor, cfg.size, cfg.seed)
    first, count = cfg.train_seeds
    cases = CaseRange(make_source(cfg.source, **({"templates": cfg.templates} if cfg.templates else {})), first, count)
    callback = MetricsCallback(metrics)
    tools = tool_schemas(brief=cfg.brief_tools) if cfg.tools else None
    model_id = f"embedded-{cfg.size}-sft" + ("" if cfg.tools else "-notools")
    marker = CheckpointMeta({"model_id": model_id, "stage": "sft", "tool_mode": cfg.tool_mode}, cfg.tool_mode, tools)
    trainer = train_sft(model, processor, cases, cfg, [callback, marker], str(latest) if latest is not None else None)
    start_recipe = dict(_meta(start).get("recipe", {}))
    rows = [r for r in metrics.rows() if "loss" in r]
    final_loss = rows[-1]["loss"] if rows else float("nan")
    meta = {
        "model_id": model_id,
        "stage": "sft",
        "tools": cfg.tools,
        "tool_mode": cfg.tool_mode,
        "parameters": n_parameters(model),
        "recipe": {**start_recipe, f"sft{len(start_recipe) + 1 if start_recipe else ''}": cfg_recipe},
        "train_seconds": round(time.perf_counter() - t0, 1),
        "final_loss": final_loss,
    }
    final = save(model, processor, out / "final", meta, cfg.tool_mode, tools)
    summary: dict[str, Any] = {
        "final": str(final),
        "steps": trainer.state.global_step,
        "final_loss": final_loss,
        "resumed_from": str(latest) if latest is not None else None,
    }
    return _finish(summary, cfg, metrics, SFT_PANELS, "sft.png")


def run_grpo(cfg: GRPOConfig, resume: bool = False) -> dict[str, Any]:
    """GRPO as configured; with ``resume``, from the newest checkpoint in ``output_dir``."""
    from medgym.rl.grpo import build_dataset, make_trainer
    from medgym.rl.policy_model import load, n_parameters, save

    out, metrics, latest, cfg_recipe = _start(cfg, resume)
    start = resolve_checkpoint(cfg.init_from or "embedded")
    model, processor = load(start, cfg.attn_implementation)  # the checkpoint's weights replace these when resuming
    model.train()
    start_meta = _meta(start)
    first, count = cfg.train_seeds
    dataset = build_dataset(list(range(first, first + count)), cfg.source, cfg.stages or None, cfg.tool_mode)
    curve = HeldOutCurve(cfg, metrics, {**start_meta, "stage": "grpo", "tool_mode": cfg.tool_mode})
    guard = CollapseGuard(cfg.collapse_floor, cfg.collapse_patience, cfg.failure_ceiling)
    # prompted with the tool list the start was trained with (a brief one, when its SFT used brief_tools)
    tools = start_meta.get("tool_schemas")
    model_id = str(start_meta.get("model_id", "embedded")).replace("-sft", "") + "-grpo"
    marker = CheckpointMeta({"model_id": model_id, "stage": "grpo", "tool_mode": cfg.tool_mode}, cfg.tool_mode, tools)
    callbacks = [MetricsCallback(metrics), curve, guard, marker]
    trainer = make_trainer(model, processor, dataset, cfg, callbacks, tools=tools)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(latest) if latest is not None else None)
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        meta = {
            "model_id": model_id,
            "stage": "grpo",
            "tool_mode": cfg.tool_mode,
            "parameters": n_parameters(model),
            "recipe": {**start_meta.get("recipe", {}), "grpo": cfg_recipe},
            "train_seconds": round(time.perf_counter() - t0, 1),
            "collapse": guard.stopped,
            "heldout_curve": curve.points,
        }
        final = save(trainer.model, processor, out / "final", meta, cfg.tool_mode, tools)
    # every rank waits for the save, then leaves the process group: a rank that exits with its gloo threads
    # still running aborts ("terminate called without an active exception") and fails the launch
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return {"steps": trainer.state.global_step, "process": accelerator.process_index}
    summary: dict[str, Any] = {
        "final": str(final),
        "steps": trainer.state.global_step,
        "stopped": guard.stopped,
        "curve": curve.points,
        "processes": accelerator.num_processes,
        "resumed_from": str(latest) if latest is not None else None,
    }
    return _finish(summary, cfg, metrics, GRPO_PANELS, "grpo.png")


def _finish(
    summary: dict[str, Any], cfg: SFTConfig | GRPOConfig, metrics: MetricsLog, panels, png: str
) -> dict[str, Any]:
    """Metrics as CSV and a plot, then the held-out evaluation of ``final`` if the config asks for one."""
    csv_path = metrics.write_csv() if metrics.rows() else None
    plot = metrics.plot(panels, png)
    summary.update(metrics=str(metrics.path), csv=str(csv_path) if csv_path else None, plot=str(plot) if plot else None)
    if cfg.eval_seeds[1]:
        summary["eval"] = evaluate_checkpoint(summary["final"], cfg, progress=not cfg.disable_tqdm)
        (Path(cfg.output_dir) / "eval.json").write_text(json.dumps(summary["eval"], indent=1))
    return summary
