"""Reward functions, shared by the Gymnasium env and TRL.

Each is a plain function with TRL's reward signature: ``completions`` (strings or
conversations) plus dataset columns as keyword lists, ``**kwargs`` always accepted,
one ``float`` (or ``None``: not applicable) per completion. Parameterised rewards are
small callable classes, so they pickle.

Columns read: ``answer``, ``answer_type`` (mc, yesno, numeric, box, open), ``choices``,
``tolerance`` (relative), ``abs_tolerance``, ``answer_box``, ``tool_calls_ok`` (how
many tool calls really ran without error in the episode).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from medgym.environments.parsing import InvalidJSON, call_arguments, completion_text, parse_action, parse_box

# How the env adds the parts up; the answer dominates.
REWARD_WEIGHTS = {"answer": 1.0, "grounding": 0.5, "format": 0.1, "tool_use": 0.2, "length": 1.0}
FORMAT_PENALTY = -0.1  # a malformed turn in the env
LOOSE_BAND = 3.0  # the loose numeric band is this many times the tight one, for half credit

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x0, y0, x1, y1] boxes.

    >>> box_iou([0, 0, 10, 10], [5, 0, 15, 10])
    0.3333333333333333
    >>> box_iou([0, 0, 1, 1], [2, 2, 3, 3])
    0.0
    """
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two boolean masks (1.0 when both are empty).

    >>> import numpy as np
    >>> a = np.zeros((4, 4), bool); a[:2] = True
    >>> b = np.zeros((4, 4), bool); b[:, :2] = True
    >>> mask_iou(a, b)
    0.3333333333333333
    """
    union = np.logical_or(pred, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, truth).sum() / union)


def _mc_letter(text: str, choices: Sequence[str]) -> str | None:
    text = text.strip()
    m = re.match(r"^\(?([A-Za-z])\)?(?:[.):]|\s|$)", text)
    if m and ord(m.group(1).upper()) - 65 < max(len(choices), 1):
        return m.group(1).upper()
    for i, c in enumerate(choices):
        if text.lower().rstrip(".") == c.lower():
            return chr(65 + i)
    return None


def _first_word(text: str) -> str | None:
    """The first word of an answer, lower case (how a yes/no answer is read)."""
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else None


def _first_number(text: str) -> float | None:
    """The first number of an answer, thousands commas ignored (how a numeric answer is read)."""
    found = _NUMBER.search(text.replace(",", ""))
    return float(found.group()) if found else None


def _answered_box(text: str, box: Sequence[float] | None) -> Sequence[float] | None:
    """The answer's box: its ``<box>``, else a box written as the answer itself."""
    return box if box is not None else parse_box(text.strip())


def score_answer(
    predicted: str | None,
    box: Sequence[float] | None,
    answer: str,
    answer_type: str,
    choices: Sequence[str] = (),
    tolerance: float = 0.0,
    abs_tolerance: float = 0.0,
    answer_box: Sequence[float] | None = None,
) -> float:
    """Correctness of one parsed answer: 1.0 right, 0.5 in the loose numeric band, else 0.0.

    >>> score_answer("B) spleen", None, "B", "mc", ["liver", "spleen"])
    1.0
    >>> score_answer("spleen", None, "B", "mc", ["liver", "spleen"])
    1.0
    >>> score_answer("Yes, it has.", None, "yes", "yesno")
    1.0
    >>> score_answer("about 10.4 mm", None, "10.0", "numeric", tolerance=0.05)
    1.0
    >>> score_answer("11.2", None, "10.0", "numeric", tolerance=0.05)
    0.5
    >>> score_answer("3", None, "2", "numeric")
    0.0
    >>> score_answer("", [0, 0, 10, 10], "[0, 0, 10, 12]", "box", answer_box=[0, 0, 10, 12])
    1.0
    >>> score_answer("The Left Lung.", None, "left lung", "open")
    1.0
    >>> score_answer("right lung", None, "left lung", "open")
    0.0
    """
    if predicted is None:
        return 0.0
    if answer_type == "mc":
        return float(_mc_letter(predicted, choices) == answer.strip().upper())
    if answer_type == "yesno":
        return float(_first_word(predicted) == answer.strip().lower())
    if answer_type == "numeric":
        value = _first_number(predicted)
        if value is None:
            return 0.0
        truth = float(answer)
        band = max(tolerance * abs(truth), abs_tolerance)
        err = abs(value - truth)
        if err <= band + 1e-9:
            return 1.0
        return 0.5 if band > 0 and err <= LOOSE_BAND * band else 0.0
    if answer_type == "box":
        truth_box = answer_box if answer_box is not None else parse_box(answer)
        pred_box = _answered_box(predicted, box)
        if truth_box is None or pred_box is None:
            return 0.0
        return float(box_iou(pred_box, truth_box) >= 0.5)
    if answer_type == "open":
        return float(normalize_open(predicted) == normalize_open(answer))
    return float(predicted.strip().lower() == answer.strip().lower())


def normalize_open(text: str) -> str:
    """Free-text answers compared the VQA way: lower case, no punctuation, no articles, single spaces.

    >>> normalize_open("  The  Liver's lesion, an enhancing one. ")
    'livers lesion enhancing one'
    """
    text = re.sub(r"[^\w\s]", "", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def _column(kwargs: dict[str, Any], name: str, n: int, default: Any = None) -> list[Any]:
    values = kwargs.get(name)
    return list(values) if values is not None else [default] * n


def answer_reward(completions: list[Any], answer: list[str], answer_type: list[str], **kwargs: Any) -> list[float]:
    """Answer correctness per completion (exact, multiple choice, numeric with tolerance bands, box IoU >= 0.5).

    >>> answer_reward(["<answer>A</answer>", "<answer>B</answer>"], answer=["A", "A"], answer_type=["mc", "mc"], choices=[["x", "y"]] * 2)
    [1.0, 0.0]
    >>> answer_reward([[{"role": "assistant", "content": "<answer>no</answer>"}]], answer=["no"], answer_type=["yesno"])
    [1.0]
    """
    n = len(completions)
    choices, tol = _column(kwargs, "choices", n, []), _column(kwargs, "tolerance", n, 0.0)
    abs_tol, boxes = _column(kwargs, "abs_tolerance", n, 0.0), _column(kwargs, "answer_box", n)
    out = []
    for i, completion in enumerate(completions):
        action = parse_action(completion_text(completion))
        out.append(
            score_answer(
                action.answer,
                action.box,
                answer[i],
                answer_type[i],
                choices[i] or (),
                tol[i] or 0.0,
                abs_tol[i] or 0.0,
                boxes[i],
            )
        )
    return out


LISTED_BOX = re.compile(r"(\d+): box \[([^\]]*)\]")


def listed_boxes(text: str) -> dict[int, list[float]]:
    """The numbered candidate boxes of a detect result's text (``1: box [x0, y0, x1, y1], ...``).

    >>> listed_boxes("2 candidate(s) of 7, best first: 1: box [3, 4, 9, 12], area 5 mm2; 2: box [1, 1, 2, 2], ...")
    {1: [3.0, 4.0, 9.0, 12.0], 2: [1.0, 1.0, 2.0, 2.0]}
    """
    out = {}
    for number, inside in LISTED_BOX.findall(text):
        box = parse_box(f"[{inside}]")
        if box is not None:
            out[int(number)] = [float(v) for v in box]
    return out


def _arguments(call: Any) -> dict[str, Any]:
    """A structured or parsed call's arguments; {} where they do not decode to an object."""
    try:
        return call_arguments(call.get("arguments") if isinstance(call, dict) else None)
    except (InvalidJSON, TypeError):
        return {}


def written_boxes(completion: Any) -> list[list[float]]:
    """The boxes a model wrote in a completion: its segment prompts (structured or ``<tool_call>`` text), then its answer's.

    A segment prompted with a detect candidate's number counts that candidate's box: the model chose it.

    >>> written_boxes([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "segment",
    ...     "arguments": {"box": [1, 2, 3, 4]}}}]}, {"role": "tool", "content": "..."},
    ...     {"role": "assistant", "content": "<answer>x</answer><box>[0, 0, 5, 5]</box>"}])
    [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, 5.0]]
    """
    messages = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    boxes: list[list[float]] = []
    listed: dict[str, dict[int, list[float]]] = {}  # study -> the last detect result's numbered boxes
    detected: list[str] = []  # studies of detect calls whose results are still to come, in order
    for m in messages:
        if not isinstance(m, dict):
            continue
        if m.get("role") == "tool":
            found = listed_boxes(completion_text(m)) if detected else {}
            if found:
                listed[detected.pop(0)] = found
            elif detected and "detect" in str(m.get("name", "detect")):
                detected.pop(0)
            continue
        if m.get("role", "assistant") != "assistant":
            continue
        calls = [c.get("function", c) for c in m.get("tool_calls") or [] if isinstance(c, dict)]
        calls += parse_action(completion_text(m)).calls
        for c in calls:
            name, args = c.get("name") if isinstance(c, dict) else None, _arguments(c)
            if name == "detect":
                detected.append(str(args.get("study", "current")))
            if name != "segment":
                continue
            box = args.get("box")
            number = args.get("candidate")
            if box is None and isinstance(number, int):
                box = listed.get(str(args.get("study", "current")), {}).get(number)
            if isinstance(box, list) and len(box) == 4 and all(_finite_number(v) for v in box):
                boxes.append([float(v) for v in box])
    final = parse_action(completion_text(completion))
    if final.box is not None:
        boxes.append([float(v) for v in final.box])
    return boxes


def _finite_number(v: Any) -> bool:
    """A real, finite number that fits a float (JSON ints may be arbitrarily large)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def grounding_reward(completions: list[Any], answer_box: list[Any], **kwargs: Any) -> list[float | None]:
    """Grounding on the model's own boxes: the mean IoU, with the ground-truth box, of every box the model wrote
    (segment prompts and the answer's box); 0.0 when it wrote none; None where the case has no box.

    Dense: a prompt box that covers the finding earns reward before the answer is right. No box a tool
    looked up counts (tools print boxes; only what the model wrote is scored).

    >>> grounding_reward(["<answer>x</answer><box>[0, 0, 10, 10]</box>", "<answer>x</answer>", "<answer>y</answer>"],
    ...                  answer_box=[[0, 0, 10, 20], [0, 0, 5, 5], None])
    [0.5, 0.0, None]
    """
    out: list[float | None] = []
    for completion, truth in zip(completions, answer_box, strict=True):
        if truth is None:
            out.append(None)
            continue
        boxes = written_boxes(completion)
        out.append(sum(box_iou(b, truth) for b in boxes) / len(boxes) if boxes else 0.0)
    return out


def answer_in_form(
    predicted: str | None, box: Sequence[float] | None, answer_type: str, choices: Sequence[str] = ()
) -> bool:
    """Whether an answer takes the form its question asks for: a listed letter or choice (mc), yes or no
    (yesno), a number (numeric), a box (box); any text for open questions. Says nothing of correctness.

    >>> answer_in_form("B", None, "mc", ["liver", "spleen"]), answer_in_form("13.8", None, "mc", ["liver", "spleen"])
    (True, False)
    >>> answer_in_form("no", None, "yesno"), answer_in_form("1", None, "yesno"), answer_in_form("C", None, "numeric")
    (True, False, False)
    >>> answer_in_form("", [0, 0, 4, 4], "box"), answer_in_form("12.5 mm", None, "numeric")
    (True, True)
    """
    if predicted is None:
        return False
    if answer_type == "mc":
        return _mc_letter(predicted, choices) is not None
    if answer_type == "yesno":
        return _first_word(predicted) in ("yes", "no")
    if answer_type == "numeric":
        return _first_number(predicted) is not None
    if answer_type == "box":
        return _answered_box(predicted, box) is not None
    return bool(predicted.strip())


def format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when the final turn is a well-formed answer in the form its question asks for (``answer_type``,
    ``choices`` columns, when given: a letter for a multiple choice, yes or no, a number, a box), else 0.0.

    >>> format_reward(["<answer>yes</answer>", "<answer>yes", '<tool_call>{"name": "zoom"}</tool_call>'])
    [1.0, 0.0, 0.0]
    >>> format_reward(["<answer>B</answer>", "<answer>13.8</answer>"], answer_type=["mc", "mc"], choices=[["x", "y"]] * 2)
    [1.0, 0.0]
    """
    n = len(completions)
    types, choices = _column(kwargs, "answer_type", n), _column(kwargs, "choices", n, [])
    out = []
    for i, completion in enumerate(completions):
        action = parse_action(completion_text(completion))
        ok = action.error is None and action.answer is not None
        if ok and types[i]:
            ok = answer_in_form(action.answer, action.box, types[i], choices[i] or ())
        out.append(float(ok))
    return out


def tool_use_reward(completions: list[Any], answer: list[str], answer_type: list[str], **kwargs: Any) -> list[float]:
    """A bonus only when a tool really ran (``tool_calls_ok`` > 0) *and* the answer is right.

    Rewarding calls alone teaches models to spam tools; rewarding nothing teaches them
    to drop tools. Tying the bonus to a correct answer avoids both.

    >>> tool_use_reward(["<answer>yes</answer>"] * 3, answer=["yes", "yes", "no"], answer_type=["yesno"] * 3,
    ...                 tool_calls_ok=[2, 0, 1])
    [1.0, 0.0, 0.0]
    """
    n = len(completions)
    ran = _column(kwargs, "tool_calls_ok", n, 0)
    correct = answer_reward(completions, answer, answer_type, **kwargs)
    return [float((ran[i] or 0) > 0 and correct[i] == 1.0) for i in range(n)]


class AnswerLengthPenalty:
    """Penalise answers longer than ``max_chars`` (0 within, down to -1 at twice the cap).

    >>> AnswerLengthPenalty(max_chars=10)(["<answer>short</answer>", "<answer>" + "x" * 15 + "</answer>", "<answer>" + "x" * 50 + "</answer>"])
    [0.0, -0.5, -1.0]
    """

    __name__ = "answer_length_penalty"

    def __init__(self, max_chars: int = 200):
        if max_chars <= 0:
            raise ValueError("max_chars must be positive")
        self.max_chars = max_chars

    def __call__(self, completions: list[Any], **kwargs: Any) -> list[float]:
        out = []
        for completion in completions:
            action = parse_action(completion_text(completion))
            length = len(action.answer or "")
            over = max(0, length - self.max_chars)
            out.append(-min(1.0, over / self.max_chars) if over else 0.0)
        return out


answer_length_penalty = AnswerLengthPenalty()

REWARD_FUNCS = {
    "answer": answer_reward,
    "grounding": grounding_reward,
    "format": format_reward,
    "tool_use": tool_use_reward,
    "length": answer_length_penalty,
}


def total_reward(parts: dict[str, float | None]) -> float:
    """The env's scalar reward: the weighted sum of the applicable parts.

    >>> total_reward({"answer": 1.0, "grounding": None, "format": 1.0, "tool_use": 1.0, "length": 0.0})
    1.3
    """
    return round(sum(REWARD_WEIGHTS[k] * v for k, v in parts.items() if v is not None), 6)


def score_parts(completion: Any, columns: dict[str, Any], tool_calls_ok: int = 0) -> dict[str, float | None]:
    """Every reward for one completion, from one case's columns."""
    batch = {k: [v] for k, v in columns.items()}
    batch["tool_calls_ok"] = [tool_calls_ok]
    return {name: fn([completion], **batch)[0] for name, fn in REWARD_FUNCS.items()}


__all__ = [
    "REWARD_FUNCS",
    "REWARD_WEIGHTS",
    "AnswerLengthPenalty",
    "answer_in_form",
    "answer_reward",
    "box_iou",
    "format_reward",
    "grounding_reward",
    "mask_iou",
    "normalize_open",
    "score_answer",
    "score_parts",
    "tool_use_reward",
    "total_reward",
]
