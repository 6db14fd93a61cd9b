"""``medgym quickstart``: the whole loop on a laptop CPU in minutes.

Builds the knowledge-base index, writes train and held-out phantom cases, evaluates the
shipped embedded policy on the held-out ones, runs a short GRPO continuation on the train
ones, evaluates again, and writes ``summary.html`` with ``summary.png`` (accuracy by stage
before/after, and the GRPO curves).

The GRPO steps are the brief-tool recipe's (:data:`RECIPE_GRPO`, as ``configs/grpo_embedded_brief_t05.yaml``):
the answer turn over the annotator expert's evidence (its calls run through the real tools), sampled at
temperature 0.5. It is a smoke run of the loop (a few GRPO steps on a dozen held-out cases cannot show a
gain beyond noise), in predicted tool mode, with constrained decoding. The runs that measure what GRPO
does are :data:`GAIN_COMMANDS`: the recipe (its GRPO phase logs a held-out validation curve) and
``medgym train bench``.
"""

from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path
from typing import Any

from medgym.environments.case import STAGES

log = logging.getLogger(__name__)

TRAIN_FIRST = 1000  # training cases: seeds 1000.. ; held-out: 0..
HELDOUT_FIRST = 0
SMOKE_NOTE = (
    "A smoke run of the loop: {steps} GRPO steps and {n} held-out cases cannot show a gain beyond noise. "
    "What GRPO does to the policy is measured by: {commands}."
)
GAIN_COMMANDS = (
    "bash scripts/embedded_recipe.sh",
    "medgym train bench --n 300 --tool-mode predicted --constrained --checkpoint embedded-sft=embedded-sft "
    "--checkpoint embedded=embedded",
)
# the GRPO settings of the brief-tool recipe (configs/grpo_embedded_brief_t05.yaml), on smaller batches
RECIPE_GRPO: dict[str, Any] = {
    "answer_evidence": "expert",
    "max_tool_calling_iterations": 0,
    "collapse_floor": 0.0,
    "loss_on": "answer",
    "advantage_floor": 0.0,
    "mask_truncated_completions": True,
    "temperature": 0.5,
    "learning_rate": 1e-4,
    "num_generations": 8,
    "per_device_train_batch_size": 16,
    "max_completion_length": 64,
    "reward_weights": [1.0, 0.0, 0.1, 0.0, 1.0],
    "beta": 0.0,
    "constrained": True,
    "segmenter": "threshold",
}


def _write_cases(folder: Path, first: int, n: int, progress: bool) -> None:
    from tqdm import tqdm

    from medgym.environments.sources import PhantomSource

    source = PhantomSource()
    index = []
    for seed in tqdm(range(first, first + n), desc=f"cases -> {folder.name}", unit="case", disable=not progress):
        case = source.case(seed)
        path = case.save(folder)
        index.append({"case_id": case.case_id, "stage": case.stage, "template": case.template, "file": path.name})
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))


def run_quickstart(
    out: str | Path,
    n_eval: int = 12,
    grpo_steps: int = 4,
    n_train: int = 16,
    progress: bool = True,
    checkpoint: str = "embedded",
    tool_mode: str = "predicted",
) -> dict[str, Any]:
    from medgym.agents.backends import EmbeddedBackend
    from medgym.environments.evaluate import evaluate
    from medgym.rl.config import GRPOConfig
    from medgym.rl.runs import resolve_checkpoint, run_grpo
    from medgym.tools import retrieve

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, start: float) -> None:
        timings[name] = round(time.perf_counter() - start, 1)

    s = time.perf_counter()
    retrieve.get_index()
    lap("index", s)

    s = time.perf_counter()
    _write_cases(out / "cases" / "train", TRAIN_FIRST, n_train, progress)
    _write_cases(out / "cases" / "heldout", HELDOUT_FIRST, n_eval, progress)
    lap("cases", s)

    def held_out(path: str | Path, name: str) -> dict[str, Any]:
        s = time.perf_counter()
        ev = evaluate(
            EmbeddedBackend(path, constrained=True),
            n=n_eval,
            seed=HELDOUT_FIRST,
            out=out / name,
            progress=progress,
            segmenter="threshold",
            tool_mode=tool_mode,
        )
        lap(name, s)
        return ev

    start = resolve_checkpoint(checkpoint)
    before = held_out(start, "eval_before")

    s = time.perf_counter()
    cfg = GRPOConfig(
        output_dir=str(out / "grpo"),
        init_from=str(start),
        train_seeds=[TRAIN_FIRST, n_train],
        eval_seeds=[HELDOUT_FIRST, 0],
        max_steps=grpo_steps,
        save_steps=0,
        disable_tqdm=not progress,
        tool_mode=tool_mode,
        **RECIPE_GRPO,
    )
    grpo = run_grpo(cfg)
    lap("grpo", s)

    after = held_out(grpo["final"], "eval_after")

    png = _plot(out / "summary.png", before, after, grpo.get("metrics"))
    summary = {
        "before": _brief(before),
        "after": _brief(after),
        "grpo": grpo,
        "tool_mode": tool_mode,
        "note": SMOKE_NOTE.format(steps=grpo_steps, n=n_eval, commands="; ".join(GAIN_COMMANDS)),
        "timings": timings,
        "seconds": round(time.perf_counter() - t0, 1),
        "png": str(png),
    }
    summary["html"] = str(_html(out / "summary.html", summary, before, after))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _brief(ev: dict[str, Any]) -> dict[str, Any]:
    keys = ("policy", "n", "accuracy", "by_stage", "mean_iou", "tool_calls", "format_errors", "mean_reward")
    return {k: ev.get(k) for k in keys}


def _plot(path: Path, before: dict[str, Any], after: dict[str, Any], metrics_file: str | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = []
    if metrics_file and Path(metrics_file).exists():
        rows = [json.loads(x) for x in Path(metrics_file).read_text().splitlines() if x.strip()]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    labels = ["all", *STAGES]
    b = [before["accuracy"], *(before["by_stage"].get(st, np.nan) for st in STAGES)]
    a = [after["accuracy"], *(after["by_stage"].get(st, np.nan) for st in STAGES)]
    x = np.arange(len(labels))
    axes[0].bar(x - 0.2, b, 0.4, label="before GRPO")
    axes[0].bar(x + 0.2, a, 0.4, label="after GRPO")
    axes[0].set_xticks(x, [lbl.replace("_", "\n") for lbl in labels], fontsize=7)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("held-out accuracy")
    axes[0].legend(fontsize=7)
    for ax, key, title in (
        (axes[1], "reward", "GRPO reward"),
        (axes[2], "tools/call_frequency", "tool calls / rollout"),
    ):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _html(path: Path, summary: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> Path:
    def row(name: str, ev: dict[str, Any]) -> str:
        cells = [f"{ev['accuracy']:.3f}", *(f"{ev['by_stage'].get(st, float('nan')):.3f}" for st in STAGES)]
        iou = "-" if ev.get("mean_iou") is None else f"{ev['mean_iou']:.3f}"
        cells += [iou, str(ev.get("tool_calls")), str(ev.get("format_errors"))]
        return f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"

    head = "".join(f"<th>{h}</th>" for h in ["", "accuracy", *STAGES, "mean IoU", "tool calls", "format errors"])
    timing = "".join(f"<li>{html.escape(k)}: {v} s</li>" for k, v in summary["timings"].items())
    text = f"""<!doctype html><html><head><meta charset="utf-8"><title>medgym quickstart</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 8px;border-bottom:1px solid #ddd}}</style></head>
<body><h1>medgym quickstart</h1>
<p>{before["n"]} held-out phantom cases, the embedded policy before and after a {summary["grpo"]["steps"]}-step GRPO
continuation (TRL GRPOTrainer with the medgym tools). Total {summary["seconds"]} s.</p>
<p><strong>{html.escape(summary["note"])}</strong> Tool mode: {html.escape(summary["tool_mode"])}.</p>
<table><tr>{head}</tr>{row("before GRPO", before)}{row("after GRPO", after)}</table>
<p><img src="summary.png" alt="accuracy and GRPO curves" style="max-width:100%"></p>
<h2>Timings</h2><ul>{timing}</ul>
<p>Traces: eval_before/traces.jsonl, eval_after/traces.jsonl; GRPO metrics: grpo/metrics.jsonl.</p>
</body></html>"""
    path.write_text(text)
    return path
