"""Cases: a study (and optional prior), a staged question, its verifiable answer and expert trace."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
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
        """Write the case as ``<id>.json`` (question, answer, trace, study settings) and ``<id>.npz`` (arrays).

        Lossless: :meth:`load` gives back every field of the case and of its studies, with the
        same types (tuples stay tuples, numpy scalars and arrays keep their dtype; see
        :func:`encode_value`). The JSON stays readable: plain values are written as they are.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        doc = {f.name: encode_value(getattr(self, f.name), arrays) for f in fields(self) if f.name not in _NOT_PLAIN}
        doc["expert_calls"] = [
            {"name": c.name, "arguments": encode_value(c.arguments, arrays)} for c in self.expert_calls
        ]
        # For people and older readers: a summary of the current study (load reads "studies").
        doc.update(
            shape=list(self.study.image.shape),
            spacing=[float(v) for v in self.study.spacing],
            modality=self.study.modality,
            has_prior=self.prior is not None,
        )
        doc["studies"] = {}
        for tag, study in (("current", self.study), ("prior", self.prior)):
            if study is None:
                continue
            arrays[f"{tag}/image"] = study.image
            arrays[f"{tag}/spacing"] = np.asarray(study.spacing, dtype=float)  # files written before "studies" read it
            for i, mask in enumerate(study.structures.values()):
                arrays[f"{tag}/structure/{i}"] = mask
            doc["studies"][tag] = {
                "spacing": encode_value(study.spacing, arrays),
                "modality": study.modality,
                "display_slice": encode_value(study.display_slice, arrays),
                "structures": list(study.structures),
                "meta": encode_value(study.meta, arrays),
            }
        doc["format"] = CASE_FORMAT
        np.savez_compressed(folder / f"{self.case_id}.npz", **arrays)
        path = folder / f"{self.case_id}.json"
        path.write_text(json.dumps(doc, indent=1, allow_nan=False))
        return path

    @classmethod
    def load(cls, json_path: Path) -> Case:
        """Read a case written by :meth:`save` (also files written before studies kept their settings)."""
        doc = json.loads(Path(json_path).read_text())
        if doc.get("format", 1) > CASE_FORMAT:
            raise ValueError(
                f"{json_path} is case format {doc['format']}, newer than this medgym reads ({CASE_FORMAT}); upgrade medgym"
            )
        with np.load(Path(json_path).with_suffix(".npz")) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if "studies" in doc:
            studies = {
                tag: Study(
                    image=arrays[f"{tag}/image"],
                    spacing=decode_value(entry["spacing"], arrays),
                    modality=entry["modality"],
                    structures={name: arrays[f"{tag}/structure/{i}"] for i, name in enumerate(entry["structures"])},
                    display_slice=decode_value(entry["display_slice"], arrays),
                    meta=decode_value(entry["meta"], arrays),
                )
                for tag, entry in doc["studies"].items()
            }
        else:  # format 1: arrays named by structure, spacing from the arrays, no display slice or meta
            studies = {}
            for tag in ("current", "prior"):
                if f"{tag}/image" not in arrays:
                    continue
                prefix = f"{tag}/mask/"
                studies[tag] = Study(
                    image=arrays[f"{tag}/image"],
                    spacing=tuple(float(s) for s in arrays[f"{tag}/spacing"]),
                    modality=doc["modality"],
                    structures={k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)},
                )
        values = {
            f.name: decode_value(doc[f.name], arrays) for f in fields(cls) if f.name in doc and f.name not in _NOT_PLAIN
        }
        values["expert_calls"] = [
            ToolCall(name=c["name"], arguments=decode_value(c["arguments"], arrays))
            for c in doc.get("expert_calls", [])
        ]
        return cls(**values, study=studies["current"], prior=studies.get("prior"))


_NOT_PLAIN = ("study", "prior", "expert_calls")  # Case fields save writes in their own way
CASE_FORMAT = 2  # 2: studies keep spacing types, display slice and meta; 1 (no "format" key): arrays only
TAG = "__medgym__"  # marks a value JSON has no literal for (see encode_value)
_NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def encode_value(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """A JSON value that :func:`decode_value` turns back into ``value``, type for type.

    Plain JSON (None, bool, int, finite float, str, list, dict with string keys) is written as it
    is. Tuples, non-finite floats, numpy scalars, dicts with other keys (or a key named like the
    tag) become ``{"__medgym__": kind, ...}``; numpy arrays go into ``arrays`` (the case's npz).

    >>> arrays = {}
    >>> encode_value({"a": [1, 2.5, "x"], "t": (1, 2)}, arrays)
    {'a': [1, 2.5, 'x'], 't': {'__medgym__': 'tuple', 'items': [1, 2]}}
    >>> decode_value(encode_value({"n": np.int16(3), "z": float("nan")}, arrays), arrays)
    {'n': np.int16(3), 'z': nan}
    """
    if value is None or isinstance(value, (bool, str)) or type(value) is int:
        return value
    if type(value) is float:
        return value if math.isfinite(value) else {TAG: "float", "value": str(value)}
    if isinstance(value, np.ndarray):
        key = f"value/{len(arrays)}"
        arrays[key] = value
        return {TAG: "array", "key": key}
    if isinstance(value, np.generic):
        return {TAG: "numpy", "dtype": value.dtype.str, "value": encode_value(value.item(), arrays)}
    if type(value) is list:
        return [encode_value(v, arrays) for v in value]
    if type(value) is tuple:
        return {TAG: "tuple", "items": [encode_value(v, arrays) for v in value]}
    if type(value) is dict:
        if all(type(k) is str for k in value) and TAG not in value:
            return {k: encode_value(v, arrays) for k, v in value.items()}
        return {TAG: "dict", "items": [[encode_value(k, arrays), encode_value(v, arrays)] for k, v in value.items()]}
    if isinstance(value, Path):
        return {TAG: "path", "value": str(value)}
    raise TypeError(
        f"cannot save a {type(value).__name__} in a case file; keep study meta and tool arguments to "
        "JSON values, tuples, paths and numpy values"
    )


def decode_value(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """The value :func:`encode_value` encoded."""
    if isinstance(value, list):
        return [decode_value(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(TAG)
    if kind is None:
        return {k: decode_value(v, arrays) for k, v in value.items()}
    if kind == "float":
        return _NON_FINITE[value["value"]]
    if kind == "array":
        return arrays[value["key"]]
    if kind == "numpy":
        return np.dtype(value["dtype"]).type(decode_value(value["value"], arrays))
    if kind == "tuple":
        return tuple(decode_value(v, arrays) for v in value["items"])
    if kind == "dict":
        return {decode_value(k, arrays): decode_value(v, arrays) for k, v in value["items"]}
    if kind == "path":
        return Path(value["value"])
    raise ValueError(f"unknown value kind {kind!r} in a case file; it was written by a newer medgym")
