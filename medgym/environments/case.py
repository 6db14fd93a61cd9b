"""Cases: a study (and optional prior), a staged question, its verifiable answer and expert trace."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medgym.tools.base import Study
from medgym.traces.schema import STAGES  # noqa: F401  (re-exported: task sources and eval import it from here)

Stage = Literal["recognition", "measurement", "visual_reasoning", "medical_reasoning"]
AnswerType = Literal["mc", "yesno", "numeric", "box", "open"]


def box_text(box: list[float]) -> str:
    """A box as answers write it: whole pixels as integers, as tool texts print them.

    >>> box_text([183.0, 86.0, 193.5, 94.0])
    '[183, 86, 193.5, 94]'
    """
    return json.dumps([int(v) if float(v).is_integer() else round(float(v), 1) for v in box])


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def as_text(self) -> str:
        return "<tool_call>" + json.dumps({"name": self.name, "arguments": self.arguments}) + "</tool_call>"


@dataclass
class Case:
    """One question on one study. ``answer`` is canonical text: a choice letter for
    multiple choice, ``yes``/``no``, a number, or ``[x0, y0, x1, y1]`` for boxes."""

    case_id: str
    source: str
    seed: int
    stage: Stage
    template: str
    question: str
    answer_type: AnswerType
    answer: str
    study: Study
    prior: Study | None = None
    choices: list[str] = field(default_factory=list)
    tolerance: float = 0.0  # relative tolerance of the tight numeric band
    abs_tolerance: float = 0.0  # absolute floor of the tight band (e.g. half a pixel in mm)
    answer_box: list[float] | None = None
    unit: str = ""
    expert_calls: list[ToolCall] = field(default_factory=list)

    @property
    def expert_answer(self) -> str:
        text = f"<answer>{self.answer}</answer>"
        if self.answer_box is not None:
            text += "<box>" + box_text(self.answer_box) + "</box>"
        return text

    def prompt(self) -> str:
        """The question as shown to the model, with choices and answer format."""
        lines = [self.question]
        if self.choices:
            lines += [f"{chr(65 + i)}) {c}" for i, c in enumerate(self.choices)]
            lines.append("Answer with the letter of one choice.")
        elif self.answer_type == "yesno":
            lines.append("Answer yes or no.")
        elif self.answer_type == "numeric":
            lines.append(f"Answer with a number{' in ' + self.unit if self.unit else ''}.")
        elif self.answer_type == "box":
            lines.append("Answer with <box>[x0, y0, x1, y1]</box> in image pixels.")
        elif self.answer_type == "open":
            lines.append("Answer with a short phrase.")
        return "\n".join(lines)

    def reward_columns(self) -> dict[str, Any]:
        """The columns the reward functions read (a TRL dataset row carries the same)."""
        return {
            "answer": self.answer,
            "answer_type": self.answer_type,
            "choices": self.choices,
            "tolerance": self.tolerance,
            "abs_tolerance": self.abs_tolerance,
            "answer_box": self.answer_box,
            "stage": self.stage,
        }

    def meta(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("study", "prior")}
        d["shape"] = list(self.study.image.shape)
        d["spacing"] = list(self.study.spacing)
        d["modality"] = self.study.modality
        d["has_prior"] = self.prior is not None
        return d

    def save(self, folder: Path) -> Path:
        """Write the case as ``<id>.json`` (question, answer, trace) and ``<id>.npz`` (arrays)."""
        folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for tag, study in (("current", self.study), ("prior", self.prior)):
            if study is None:
                continue
            arrays[f"{tag}/image"] = study.image
            arrays[f"{tag}/spacing"] = np.asarray(study.spacing)
            for name, mask in study.structures.items():
                arrays[f"{tag}/mask/{name}"] = mask
        np.savez_compressed(folder / f"{self.case_id}.npz", **arrays)
        path = folder / f"{self.case_id}.json"
        path.write_text(json.dumps(self.meta(), indent=1))
        return path

    @classmethod
    def load(cls, json_path: Path) -> Case:
        meta = json.loads(Path(json_path).read_text())
        arrays = np.load(Path(json_path).with_suffix(".npz"))
        studies: dict[str, Study] = {}
        for tag in ("current", "prior"):
            if f"{tag}/image" not in arrays:
                continue
            prefix = f"{tag}/mask/"
            studies[tag] = Study(
                image=arrays[f"{tag}/image"],
                spacing=tuple(float(s) for s in arrays[f"{tag}/spacing"]),
                modality=meta["modality"],
                structures={k[len(prefix) :]: arrays[k] for k in arrays.files if k.startswith(prefix)},
            )
        fields = {k: v for k, v in meta.items() if k in cls.__dataclass_fields__}
        fields["expert_calls"] = [ToolCall(**c) for c in meta["expert_calls"]]
        return cls(**fields, study=studies["current"], prior=studies.get("prior"))
