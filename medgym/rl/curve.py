"""What GRPO is doing to the policy, measured while it trains.

:class:`HeldOutCurve` evaluates the live policy every ``curve_every`` steps (and before the first)
on a fixed set of held-out cases (``curve_seeds``, disjoint from ``train_seeds``) with the config's
tools (predicted mode by default) and greedy decoding, through the same :func:`medgym.environments.evaluate.evaluate`
and :class:`medgym.agents.backends.EmbeddedBackend` that ``medgym eval --policy embedded:PATH`` uses
(the weights are written to a scratch folder and loaded as a checkpoint: exactly the shipped path).
Each point goes to ``metrics.jsonl`` as ``heldout/*`` keys: accuracy overall and per stage, the share of
answers in the form their question asks, grounding IoU of the model's boxes, format errors and tool
calls per episode.

:class:`CollapseGuard` watches TRL's ``tools/call_frequency``: small policies trained with RL are
known to stop calling tools; when the frequency stays below ``collapse_floor`` for
``collapse_patience`` logged steps in a row, it warns and stops training with a message that says so.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from medgym.rl.config import GRPOConfig
    from medgym.rl.metrics import MetricsLog

log = logging.getLogger(__name__)

ERR_DRIFT = (
    "tool-call drift: tools/failed_share stayed above failure_ceiling={ceiling} for {n} logged steps "
    "(last {last:.3f}) at step {step}; training stopped. The policy is writing calls its tools reject: "
    "lower learning_rate or temperature, raise tool_failure_weight, or continue from an earlier checkpoint-N."
)
ERR_COLLAPSE = (
    "tool-call collapse: tools/call_frequency stayed below collapse_floor={floor} for {n} logged steps "
    "(last {last:.3f}) at step {step}; training stopped. Lower learning_rate, raise the tool_use reward "
    "weight, or continue from an earlier checkpoint-N."
)


def heldout_row(summary: dict[str, Any]) -> dict[str, float]:
    """The ``heldout/*`` metrics of one evaluation summary (:data:`medgym.environments.evaluate.SUMMARY_KEYS`)."""
    n = max(int(summary["n"]), 1)
    row = {
        "heldout/accuracy": float(summary["accuracy"]),
        "heldout/answer_form": float(summary["answer_form"]),
        "heldout/grounding_iou": float(summary["mean_iou"] or 0.0),
        "heldout/format_errors_per_episode": summary["format_errors"] / n,
        "heldout/format_error_rate": float(summary["format_error_rate"]),
        "heldout/tool_calls_per_episode": summary["tool_calls"] / n,
        "heldout/mean_reward": float(summary["mean_reward"]),
    }
    row.update({f"heldout/{stage}": float(v) for stage, v in summary["by_stage"].items()})
    return row


@contextlib.contextmanager
def live_backend(
    model,
    processor,
    meta: dict[str, Any],
    tool_mode: str,
    constrained: bool,
    tools: list[dict[str, Any]] | None = None,
) -> Iterator[Any]:
    """The live weights as an :class:`~medgym.agents.backends.EmbeddedBackend`: saved to a scratch folder and
    loaded as a checkpoint, so the policy is prompted and decoded exactly as ``medgym eval --policy embedded:PATH``
    would (``meta``'s or ``tools``' tool list, the system text of ``tool_mode``)."""
    from medgym.agents.backends import EmbeddedBackend
    from medgym.rl.policy_model import save

    with tempfile.TemporaryDirectory() as folder:
        save(model, processor, folder, meta, tool_mode, tools)
        yield EmbeddedBackend(folder, constrained=constrained)


class HeldOutCurve(TrainerCallback):
    """Held-out evaluation of the live policy every ``cfg.curve_every`` steps, written to ``metrics``."""

    def __init__(self, cfg: GRPOConfig, metrics: MetricsLog, meta: dict[str, Any]):
        self.cfg = cfg
        self.metrics = metrics
        self.meta = meta
        self.points: list[dict[str, Any]] = []

    def evaluate(self, model, processor, step: int) -> dict[str, Any]:
        from medgym.environments.evaluate import evaluate

        first, count = self.cfg.curve_seeds
        was_training = model.training
        meta = {**self.meta, "model_id": f"grpo-step-{step}"}
        with live_backend(model, processor, meta, self.cfg.tool_mode, self.cfg.constrained) as policy:
            summary = evaluate(
                policy, self.cfg.source, count, first, tool_mode=self.cfg.tool_mode, segmenter=self.cfg.segmenter
            )
        model.train(was_training)
        row = {"step": step, **heldout_row(summary)}
        self.metrics.append(row)
        self.points.append(row)
        log.info("held-out at step %d: %s", step, row)
        return row

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.cfg.curve_every and state.is_world_process_zero and state.global_step == 0:
            self.evaluate(model, processing_class, 0)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        every = self.cfg.curve_every
        if every and state.is_world_process_zero and state.global_step % every == 0:
            self.evaluate(model, processing_class, state.global_step)


class CollapseGuard(TrainerCallback):
    """Stops training when the tool-call frequency stays below a floor, or the share of failed calls above a
    ceiling (each 0: off), for ``patience`` logged steps in a row."""

    def __init__(self, floor: float, patience: int = 3, failure_ceiling: float = 0.0):
        self.floor = floor
        self.failure_ceiling = failure_ceiling
        self.patience = max(1, patience)
        self.below = 0
        self.above = 0
        self.stopped: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        value, failed = logs.get("tools/call_frequency"), logs.get("tools/failed_share")
        if self.floor and value is not None:
            self.below = self.below + 1 if value < self.floor else 0
            if self.below >= self.patience:
                self._stop(
                    control, ERR_COLLAPSE.format(floor=self.floor, n=self.below, last=value, step=state.global_step)
                )
        if self.failure_ceiling and failed is not None:
            self.above = self.above + 1 if failed > self.failure_ceiling else 0
            if self.above >= self.patience:
                self._stop(
                    control,
                    ERR_DRIFT.format(ceiling=self.failure_ceiling, n=self.above, last=failed, step=state.global_step),
                )

    def _stop(self, control, message: str) -> None:
        self.stopped = message
        log.warning(message)
        control.should_training_stop = True


__all__ = ["ERR_COLLAPSE", "ERR_DRIFT", "CollapseGuard", "HeldOutCurve", "heldout_row"]
