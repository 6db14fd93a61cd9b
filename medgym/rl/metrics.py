"""Training metrics: an append-only JSONL log, a CSV copy and PNG curves (matplotlib, Agg).

:class:`MetricsCallback` writes what a ``transformers.Trainer`` logs (SFT and GRPO alike). A run
resumed from ``checkpoint-N`` continues the curve from step N: rows the crashed run logged after
its last checkpoint are dropped when training starts again, since the resumed run logs those
steps anew.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger(__name__)

# What the GRPO plots show: (title, candidate keys in TRL's logs, first found wins).
GRPO_PANELS = [
    ("reward", ("reward",)),
    ("held-out accuracy", ("heldout/accuracy",)),
    ("held-out grounding IoU", ("heldout/grounding_iou",)),
    ("held-out answers in the asked form", ("heldout/answer_form",)),
    ("held-out format errors / episode", ("heldout/format_errors_per_episode",)),
    ("tool-call frequency", ("tools/call_frequency",)),
    ("tool failure frequency", ("tools/failure_frequency",)),
    ("rollouts cut by the token budget", ("rollouts/cut_by_budget",)),
    ("KL to start model (none at beta 0)", ("kl",)),
    ("answer reward (rollouts)", ("rewards/answer/mean",)),
]
SFT_PANELS = [("loss", ("loss",)), ("learning rate", ("learning_rate", "lr"))]


class MetricsLog:
    """Rows of numbers keyed by ``step``; appended to ``metrics.jsonl`` as they come."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.jsonl"

    def append(self, row: dict[str, Any]) -> None:
        clean = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) or v is None}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        """The rows written so far; a line torn by a killed process is skipped."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def keep_until(self, step: int) -> None:
        """Drop the rows logged after ``step`` (0: all of them)."""
        rows = [r for r in self.rows() if r.get("step", 0) <= step] if step > 0 else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write_csv(self) -> Path:
        rows = self.rows()
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
        out = self.folder / "metrics.csv"
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        return out

    def plot(self, panels: list[tuple[str, tuple[str, ...]]], name: str = "metrics.png") -> Path | None:
        """One panel per metric over steps; panels with no data say so."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows() if "step" in r]
        if not rows:
            return None
        cols = min(len(panels), 4)
        grid_rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(grid_rows, cols, figsize=(4 * cols, 3.2 * grid_rows), squeeze=False)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax, (title, keys) in zip(axes.flat, panels, strict=False):
            key = next((k for k in keys if any(k in r for r in rows)), None)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            if key is None:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
                continue
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=2)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        out = self.folder / name
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


class MetricsCallback(TrainerCallback):
    """What the Trainer logs, appended to ``metrics.jsonl`` with the wall time of the step just finished."""

    def __init__(self, metrics: MetricsLog):
        self.metrics = metrics
        self.step_started: float | None = None
        self.step_seconds: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # the state is the checkpoint's when resuming, else step 0
            self.metrics.keep_until(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_started is not None:
            self.step_seconds = time.perf_counter() - self.step_started

    def on_log(self, args, state, control, logs=None, **kwargs):
        # One writer under `accelerate launch`; the end-of-training summary (train_runtime, ...) is not a step.
        if logs and state.is_world_process_zero and "train_runtime" not in logs:
            timing = {"step_seconds": self.step_seconds} if self.step_seconds is not None else {}
            self.metrics.append({"step": state.global_step, **logs, **timing})
