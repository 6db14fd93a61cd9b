"""Held-out comparison of policies: accuracy by stage, mean IoU and tool use (``medgym train bench``)."""

from __future__ import annotations

import time
from typing import Any

from medgym.environments.case import STAGES
from medgym.environments.evaluate import SUMMARY_KEYS


def bootstrap_difference(
    a: list[float], b: list[float], n_boot: int = 5000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Mean of ``a - b`` over paired cases and its percentile bootstrap interval (cases resampled).

    >>> r = bootstrap_difference([1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], n_boot=2000)
    >>> r["difference"], r["low"] <= r["difference"] <= r["high"]
    (0.5, True)
    """
    import numpy as np

    if len(a) != len(b) or not a:
        raise ValueError("bootstrap_difference needs two equally long, non-empty lists of paired values")
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"difference": round(float(d.mean()), 4), "low": round(float(low), 4), "high": round(float(high), 4)}


def is_prior(path: str) -> bool:
    """``prior`` or ``prior:N``: the answer-prior baseline (:class:`~medgym.environments.policies.AnswerPriorPolicy`),
    read as :func:`~medgym.agents.backends.make_policy` reads specs (which refuses a bad N)."""
    from medgym.agents.backends import parse_spec

    return parse_spec(path)[0] == "prior"


BLIND = "blind:"
# What a bench keeps of each policy's evaluation summary: its figures, not the run's settings (recorded once per
# bench), the mask overlaps, the truncation count or the trace path.
NOT_BENCHED = ("n", "source", "policy", "tool_mode", "blind", "mean_mask_iou", "mean_mask_dice", "truncated", "traces")
BENCH_KEYS = tuple(k for k in SUMMARY_KEYS if k not in NOT_BENCHED)


def blind_spec(path: str) -> tuple[bool, str]:
    """``blind:SPEC`` names the policy of SPEC reading every picture black (its tools still see the study):
    whether it is blind, and SPEC.

    >>> blind_spec("blind:embedded"), blind_spec("runs/x/final")
    ((True, 'embedded'), (False, 'runs/x/final'))
    """
    return (True, path[len(BLIND) :]) if path.startswith(BLIND) else (False, path)


def weights_digest(spec: str) -> str:
    """The first 16 hex digits of the SHA-256 of a checkpoint folder's ``model.safetensors`` ("" for the expert,
    the prior and a folder without weights): what a later bench's ``--reuse`` checks, since a checkpoint
    re-shipped or retrained in place keeps its path."""
    import hashlib
    from pathlib import Path

    weights = Path(spec) / "model.safetensors"
    if not weights.is_file():
        return ""
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def run_bench(
    checkpoints: dict[str, str],
    n: int = 30,
    seed: int = 0,
    source: str = "phantom",
    progress: bool = True,
    tool_mode: str = "predicted",
    constrained: bool = False,
    compare: list[tuple[str, str]] | None = None,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The expert and each named checkpoint on cases ``seed .. seed + n - 1`` (threshold segmenter).

    ``compare`` names pairs (A, B): each gets the paired bootstrap 95 % interval of A - B in accuracy
    and answer-box IoU (default: every checkpoint against the first one). ``previous``, an earlier
    bench on the same cases and settings, lends the results (and per-case rows) of the policies it
    ran under the same name and checkpoint (the same path and weights: :func:`weights_digest`; a bench written
    before digests were recorded is matched on the path alone), so a new checkpoint is compared without
    re-running the others.
    A checkpoint given as ``blind:PATH`` runs with every picture it reads black (:func:`blind_spec`): beside
    the same PATH run normally, the difference is what looking adds.
    """
    from medgym.agents.backends import EmbeddedBackend, make_policy
    from medgym.environments.evaluate import evaluate
    from medgym.environments.policies import ExpertPolicy
    from medgym.rl.runs import resolve_checkpoint

    settings = {"n": n, "seed": seed, "source": source, "tool_mode": tool_mode, "constrained": constrained}

    # name -> (blind, the policy's spec resolved: a checkpoint folder, prior[:N] or expert), parsed once
    targets = {"expert": (False, "expert")}
    for name, path in checkpoints.items():
        blind, spec = blind_spec(path)
        targets[name] = (blind, spec if is_prior(spec) else str(resolve_checkpoint(spec)))
    paths = {name: (BLIND if blind else "") + spec for name, (blind, spec) in targets.items()}
    weights = {
        name: "" if is_prior(spec) or spec == "expert" else weights_digest(spec) for name, (_, spec) in targets.items()
    }
    out, cases = {}, {}
    if previous and all(previous.get(k) == v for k, v in settings.items()):
        before = previous.get("weights")
        for name, path in paths.items():
            same_weights = before is None or before.get(name, "") == weights[name]
            if previous.get("paths", {}).get(name) == path and same_weights and name in previous.get("cases", {}):
                out[name], cases[name] = previous["results"][name], previous["cases"][name]
    policies: dict[str, Any] = {}
    for name, (_, spec) in targets.items():
        if name in out:
            continue
        if name == "expert":
            policies[name] = ExpertPolicy(tool_mode=tool_mode)
        elif is_prior(spec):
            policies[name] = make_policy(spec, source=source)
        else:
            policies[name] = EmbeddedBackend(spec, constrained=constrained)
    for name, policy in policies.items():
        t0 = time.perf_counter()
        cases[name] = []
        ev = evaluate(
            policy,
            source=source,
            n=n,
            seed=seed,
            progress=progress,
            segmenter="threshold",
            tool_mode=tool_mode,
            per_case=cases[name],
            blind=targets[name][0],
        )
        out[name] = {k: ev[k] for k in BENCH_KEYS}
        out[name]["tool_calls_per_episode"] = ev["tool_calls"] / n
        out[name]["seconds_per_case"] = round((time.perf_counter() - t0) / n, 3)
    names = list(checkpoints)
    pairs = compare if compare is not None else [(other, names[0]) for other in names[1:]]
    differences = {}
    for a, b in pairs:
        acc = bootstrap_difference([float(c["correct"]) for c in cases[a]], [float(c["correct"]) for c in cases[b]])
        iou = bootstrap_difference(
            [c["box_iou"] or 0.0 for c in cases[a]], [c["box_iou"] or 0.0 for c in cases[b]], seed=1
        )
        differences[f"{a} - {b}"] = {"accuracy": acc, "answer_box_iou": iou}
    order = list(paths)
    return {
        **settings,
        "paths": paths,
        "weights": weights,
        "results": {k: out[k] for k in order},
        "differences": differences,
        "cases": {k: cases[k] for k in order},
    }


def bench_table(bench: dict[str, Any]) -> str:
    """The bench as a Markdown table: accuracy overall and per stage (cases in brackets), IoU, tool use, and the
    share of answers in the form their question asks (a letter, yes/no, a number, a box; "-" in older benches).

    >>> row = {"accuracy": 0.5, "by_stage": {"measurement": 0.25}, "n_by_stage": {"measurement": 4},
    ...        "mean_iou": 0.1, "tool_calls": 3, "format_errors": 2, "answer_form": 0.75}
    >>> print(bench_table({"n": 4, "results": {"sft": row}}).splitlines()[2])
    | sft | 0.500 | - | 0.250 (4) | - | - | 0.100 | 3 | 2 | 0.750 |
    """
    head = ["policy", "accuracy", *STAGES, "mean IoU", "tool calls", "format errors", "answer in form"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in bench["results"].items():
        by_stage, counts = r.get("by_stage", {}), r.get("n_by_stage", {})
        stages = [f"{by_stage[s]:.3f} ({counts.get(s, '?')})" if s in by_stage else "-" for s in STAGES]
        iou = r.get("mean_iou")
        cells = [
            name,
            f"{r['accuracy']:.3f}",
            *stages,
            f"{iou:.3f}" if iou is not None else "-",
            str(r.get("tool_calls", "-")),
            str(r.get("format_errors", "-")),
            f"{r['answer_form']:.3f}" if r.get("answer_form") is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for pair, diff in bench.get("differences", {}).items():
        acc, iou = diff["accuracy"], diff["answer_box_iou"]
        lines.append(
            f"\n{pair}: accuracy {acc['difference']:+.3f} [95% CI {acc['low']:+.3f}, {acc['high']:+.3f}], "
            f"answer-box IoU {iou['difference']:+.3f} [{iou['low']:+.3f}, {iou['high']:+.3f}]"
        )
    return "\n".join(lines)
