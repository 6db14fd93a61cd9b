"""Reliability index: do several sampled runs of the agent agree on the answer?

Run the same question N times at temperature > 0; the score is the fraction of runs whose
answer agrees with the majority answer. Answers agree when the case's own scoring calls them
the same (multiple choice letter, yes/no, numbers within the case's tolerance band); without a
case, numbers agree within ``DEFAULT_REL_TOL`` and other answers when their normalised text is equal.
"""

from __future__ import annotations

import re
from typing import Any

from medgym.environments.case import Case
from medgym.environments.rewards import score_answer

DEFAULT_REL_TOL = 0.05
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+(?:\.\d+)?", text.lower()))


def answers_agree(a: str | None, b: str | None, case: Case | None = None) -> bool:
    """Whether two answers say the same thing (symmetric for numbers within tolerance).

    >>> answers_agree("12.0 mm", "12.4", None)
    True
    >>> answers_agree("yes", "no", None)
    False
    """
    if a is None or b is None:
        return a is b
    if case is not None and case.answer_type in ("mc", "yesno", "numeric"):
        if case.answer_type == "numeric":
            na, nb = _NUMBER.search(a.replace(",", "")), _NUMBER.search(b.replace(",", ""))
            if not (na and nb):
                return False
            truth = nb.group()
        elif case.answer_type == "mc":
            truth = next(
                (
                    chr(65 + i)
                    for i in range(max(len(case.choices), 1))
                    if score_answer(b, None, chr(65 + i), "mc", case.choices) == 1.0
                ),
                None,
            )
            if truth is None:
                return _norm(a) == _norm(b)
        else:
            truth = (re.findall(r"[a-z]+", b.lower()) or [""])[0]
        return score_answer(a, None, truth, case.answer_type, case.choices, case.tolerance, case.abs_tolerance) == 1.0
    na, nb = _NUMBER.search(a.replace(",", "")), _NUMBER.search(b.replace(",", ""))
    if na and nb:
        x, y = float(na.group()), float(nb.group())
        return abs(x - y) <= DEFAULT_REL_TOL * max(abs(x), abs(y)) + 1e-9
    return _norm(a) == _norm(b)


def agreement(answers: list[str | None], case: Case | None = None) -> dict[str, Any]:
    """Majority answer and the fraction of answers agreeing with it.

    >>> agreement(["10 mm", "10.2 mm", "15 mm"])["score"]
    0.667
    """
    if not answers:
        return {"n": 0, "score": None, "majority": None, "answers": []}
    support = [sum(answers_agree(other, a, case) for other in answers) for a in answers]
    best = max(range(len(answers)), key=lambda i: (support[i], -i))
    return {
        "n": len(answers),
        "score": round(support[best] / len(answers), 3),
        "majority": answers[best],
        "answers": answers,
    }
