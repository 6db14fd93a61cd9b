"""Scores from trace files: accuracy by stage, IoU, tool use, answer-evidence consistency, steps.

Everything is computed from the recorded episodes alone (no re-run, no model):

- **accuracy**: share of episodes whose answer scored 1.0 (the ``answer`` reward part);
  an episode that never answered (truncated) counts as wrong. Overall and per stage.
- **mean IoU**: mean of the ``grounding`` reward part (IoU of the answer's box with the
  ground-truth box) over episodes whose case has a box.
- **tools**: calls, error results and failure rate per tool name (unknown names included).
- **answer-evidence consistency** (numeric answers only; see :func:`evidence_status`):
  does the final number agree with a number the ``measure`` tool returned in the same
  episode? It applies to episodes whose case asks for a physical quantity (a unit other
  than ``""`` and ``"%"``: mm, mm2, mL, HU), because counts and percent changes are
  derived from several tool outputs rather than returned by ``measure``. Files written
  before the unit was recorded treat every numeric answer as a quantity.
- **steps**: model turns per episode.

Episodes without a known answer (a chat question: empty ``answer``) are counted in
``episodes``, tool use and steps, but left out of accuracy and consistency (``unscored``).

Several files are compared side by side by :func:`format_table` (text) and
:func:`plot_stages` (a PNG bar chart of accuracy per stage).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from medgym.traces.schema import STAGES, TraceEpisode
from medgym.traces.store import read_traces

NON_QUANTITY_UNITS = ("", "%")
EVIDENCE_TOOL = "measure"

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def first_number(text: str | None) -> tuple[float, float] | None:
    """The first number in an answer and half a unit of its last written digit (its rounding).

    >>> first_number("about 22.25 mm")
    (22.25, 0.005)
    >>> first_number("3 lesions")
    (3.0, 0.5)
    >>> first_number("none") is None
    True
    """
    if not text:
        return None
    found = _NUMBER.search(text.replace(",", ""))
    if not found:
        return None
    token = found.group()
    mantissa = re.split(r"[eE]", token)[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(re.split(r"[eE]", token)[1]) if re.search(r"[eE]", token) else 0
    return float(token), 0.5 * 10.0 ** (exponent - decimals)


def numbers_in(value: Any) -> list[float]:
    """Every finite number (not bool) in a JSON-like value.

    >>> numbers_in({"d": 17.2, "ok": True, "per": [{"area": 3}], "name": "x"})
    [17.2, 3.0]
    """
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)] if math.isfinite(value) else []
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_in(v)]
    return []


def is_correct(episode: TraceEpisode) -> bool:
    return episode.score.get("answer") == 1.0


def is_scored(episode: TraceEpisode) -> bool:
    """Whether the episode has a known answer to score against (chat questions have none)."""
    return bool(episode.header.answer.strip())


def evidence_status(episode: TraceEpisode) -> str | None:
    """Answer-evidence consistency of one episode.

    None when it does not apply: the answer is not numeric, or the case asks for a count
    or a percentage (unit ``""`` or ``"%"``). Otherwise:

    - ``"no_answer"``: the final answer holds no number (or there is none);
    - ``"unsupported"``: no ``measure`` call succeeded in the episode;
    - ``"consistent"``: some number ``v`` in the data of a successful ``measure`` call
      satisfies ``|a - v| <= max(tolerance * |v|, abs_tolerance, r)``, where ``a`` is the
      answer's first number, ``tolerance``/``abs_tolerance`` are the case's (the band the
      answer reward uses, centred on the measured value) and ``r`` is half a unit of the
      answer's last written digit (so "22.2" agrees with a measured 22.213);
    - ``"contradicted"``: otherwise.
    """
    header = episode.header
    if header.answer_type != "numeric" or not is_scored(episode):
        return None
    if header.unit is not None and header.unit in NON_QUANTITY_UNITS:
        return None
    parsed = first_number(episode.final_answer)
    if parsed is None:
        return "no_answer"
    answer, rounding = parsed
    evidence = [
        v
        for step in episode.steps
        for call in step.calls
        if call.name == EVIDENCE_TOOL and not call.error
        for v in numbers_in(call.data)
    ]
    if not evidence:
        return "unsupported"
    tol, abs_tol = header.tolerance or 0.0, header.abs_tolerance or 0.0
    for v in evidence:
        if abs(answer - v) <= max(tol * abs(v), abs_tol, rounding) + 1e-9:
            return "consistent"
    return "contradicted"


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def score_episodes(episodes: Iterable[TraceEpisode], problems: Sequence[str] = ()) -> dict[str, Any]:
    """All scores of a set of episodes as a JSON-ready dict (see the module docstring)."""
    episodes = list(episodes)
    by_stage: dict[str, list[float]] = defaultdict(list)
    ious: list[float] = []
    steps: list[int] = []
    rewards: list[float] = []
    calls: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    evidence: Counter[str] = Counter()
    answered = truncated = format_errors = unscored = 0
    modes: Counter[str] = Counter()
    for ep in episodes:
        modes[tool_mode_label(ep)] += 1
        if is_scored(ep):
            by_stage[ep.header.stage].append(1.0 if is_correct(ep) else 0.0)
        else:
            unscored += 1
        grounding = ep.score.get("grounding")
        if grounding is not None:
            ious.append(float(grounding))
        steps.append(len(ep.steps))
        rewards.append(ep.reward)
        answered += ep.final_answer is not None
        truncated += ep.truncated
        for step in ep.steps:
            format_errors += step.format_error is not None
            for call in step.calls:
                calls[call.name] += 1
                errors[call.name] += call.error
        status = evidence_status(ep)
        if status is not None:
            evidence[status] += 1
    every = [c for v in by_stage.values() for c in v]
    stages = [s for s in STAGES if s in by_stage] + sorted(set(by_stage) - set(STAGES))
    applicable = sum(evidence.values())
    return {
        "episodes": len(episodes),
        "tool_modes": dict(sorted(modes.items())),
        "unscored": unscored,
        "answered": answered,
        "truncated": truncated,
        "accuracy": _mean(every),
        "by_stage": {s: {"n": len(by_stage[s]), "accuracy": _mean(by_stage[s])} for s in stages},
        "mean_iou": _mean(ious),
        "n_iou": len(ious),
        "tools": {
            name: {"calls": calls[name], "errors": errors[name], "failure_rate": errors[name] / calls[name]}
            for name in sorted(calls)
        },
        "tool_calls": sum(calls.values()),
        "format_errors": format_errors,
        "consistency": {
            "applicable": applicable,
            "rate": evidence["consistent"] / applicable if applicable else None,
            **{k: evidence[k] for k in ("consistent", "contradicted", "unsupported", "no_answer")},
        },
        "steps": {
            "mean": _mean(steps),
            "min": min(steps) if steps else None,
            "max": max(steps) if steps else None,
        },
        "mean_reward": _mean(rewards),
        "problems": list(problems),
    }


def tool_mode_label(episode: TraceEpisode) -> str:
    """The episode's tool mode; traces from before tool modes ran their tools as the oracle does."""
    return episode.header.tool_mode or "oracle"


def mode_mismatch(scores: Sequence[dict[str, Any]], names: Sequence[str]) -> str | None:
    """A warning when files side by side ran their tools in different modes (oracle is an upper bound), else None.

    >>> mode_mismatch([{"tool_modes": {"predicted": 3}}, {"tool_modes": {"oracle": 3}}], ["a", "b"])
    'these files ran their tools in different modes (a: predicted; b: oracle); oracle scores are an upper bound, not comparable with predicted ones'
    """
    modes = [", ".join(sorted(s.get("tool_modes", {}))) for s in scores]
    if len(set(modes)) <= 1 and all("," not in m for m in modes):
        return None
    listed = "; ".join(f"{n}: {m}" for n, m in zip(names, modes, strict=True))
    return (
        f"these files ran their tools in different modes ({listed}); "
        "oracle scores are an upper bound, not comparable with predicted ones"
    )


def score_file(path: Path | str) -> dict[str, Any]:
    """Scores of one trace file; lines that do not load (a torn last line) are listed in ``problems``."""
    traces = read_traces(path)
    out = score_episodes(traces.episodes, traces.problems)
    out["path"] = str(path)
    return out


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if pct else f"{value:.3f}"
    return str(value)


def _keyed_cells(
    scores: Sequence[dict[str, Any]], group: str, key: str, cell: Callable[[dict[str, Any]], str]
) -> list[str]:
    """One cell per file for ``score[group][key]`` (a stage, a tool), ``-`` where a file has none."""
    return [cell(s[group][key]) if key in s[group] else "-" for s in scores]


def table_rows(scores: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(row label, one cell per file) for the side-by-side table."""
    rows: list[tuple[str, list[str]]] = [
        ("episodes", [_fmt(s["episodes"]) for s in scores]),
        ("tool mode", [", ".join(s.get("tool_modes", {})) or "-" for s in scores]),
        ("accuracy", [_fmt(s["accuracy"], pct=True) for s in scores]),
    ]
    stages = list(dict.fromkeys(st for s in scores for st in s["by_stage"]))
    for st in stages:
        cell = _keyed_cells(scores, "by_stage", st, lambda v: f"{_fmt(v['accuracy'], pct=True)} (n={v['n']})")
        rows.append((f"  {st}", cell))
    rows.append(("mean IoU", [_fmt(s["mean_iou"]) for s in scores]))
    rows.append(
        (
            "answer-evidence consistency",
            [f"{_fmt(s['consistency']['rate'], pct=True)} (n={s['consistency']['applicable']})" for s in scores],
        )
    )
    rows.append(("steps per episode", [_fmt(s["steps"]["mean"]) for s in scores]))
    rows.append(("tool calls", [_fmt(s["tool_calls"]) for s in scores]))
    for name in sorted({n for s in scores for n in s["tools"]}):
        cell = _keyed_cells(scores, "tools", name, lambda v: f"{v['calls']} / {_fmt(v['failure_rate'], pct=True)}")
        rows.append((f"  {name} calls / failed", cell))
    rows.append(("format errors", [_fmt(s["format_errors"]) for s in scores]))
    rows.append(("truncated", [_fmt(s["truncated"]) for s in scores]))
    rows.append(("mean reward", [_fmt(s["mean_reward"]) for s in scores]))
    rows.append(("unreadable lines", [_fmt(len(s["problems"])) for s in scores]))
    return rows


def format_table(scores: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """A plain-text table: one column per file."""
    rows = table_rows(scores)
    width0 = max(len(label) for label, _ in rows)
    widths = [max(len(names[i]), *(len(cells[i]) for _, cells in rows)) for i in range(len(names))]
    lines = [" " * width0 + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True))]
    for label, cells in rows:
        lines.append(label.ljust(width0) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


def short_names(paths: Sequence[str | Path]) -> list[str]:
    """Distinct short column names for files: the file name, or parent/name when names repeat."""
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def plot_stages(scores: Sequence[dict[str, Any]], names: Sequence[str], out: Path | str) -> Path:
    """A PNG bar chart: accuracy per stage (and overall), one bar per file."""
    # The object API with the Agg canvas: no pyplot state, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = list(dict.fromkeys(st for s in scores for st in s["by_stage"])) + ["overall"]
    fig = Figure(figsize=(max(6.0, 1.6 * len(stages) + 0.4 * len(scores)), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(scores))
    for i, (s, name) in enumerate(zip(scores, names, strict=True)):
        raw = [s["accuracy"] if st == "overall" else s["by_stage"].get(st, {}).get("accuracy") for st in stages]
        xs = [k + (i - (len(scores) - 1) / 2) * width for k in range(len(stages))]
        bars = ax.bar(xs, [v or 0.0 for v in raw], width=width, label=name)
        # A stage a file has no episodes of is marked "n/a", not drawn as 0.
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:.2f}" for v in raw], fontsize=7, padding=1)
    ax.set_xticks(range(len(stages)), [st.replace("_", "\n") for st in stages])
    ax.set_ylim(0, 1.3)
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy by stage")
    ax.legend(fontsize=8, loc="upper center", ncol=min(len(scores), 3), frameon=False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
