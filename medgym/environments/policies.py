"""Scripted policies: the expert that follows a case's expert trace, one tool call per turn."""

from __future__ import annotations

from typing import Any

from medgym.environments.case import Case


class ExpertPolicy:
    """Replays the case's expert calls, then gives the known answer (with its box, if any)."""

    model_id = "expert"

    def __init__(self) -> None:
        self._turns: list[str] = []

    def reset(self, case: Case, observation: dict[str, Any] | None = None) -> None:
        self._turns = [call.as_text() for call in case.expert_calls] + [case.expert_answer]

    def act(self, observation: dict[str, Any] | None = None) -> str:
        if not self._turns:
            raise RuntimeError("the expert has already answered; reset it with the next case")
        return self._turns.pop(0)
