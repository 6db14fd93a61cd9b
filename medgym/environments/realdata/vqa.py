"""``VQASource``: VQA-RAD / SLAKE / PathVQA-style question files as cases without expert traces.

A dataset is a folder (or one file) of question files - JSON (a list of records, or
``{"data": [...]}``), JSON Lines or CSV - each record naming an image, a question, an
answer and, where the dataset has it, the answer type (``CLOSED`` / ``OPEN``). Column
names vary between datasets; the aliases understood are in ``ALIASES`` (VQA-RAD's
``image_name`` / ``question_type``, SLAKE's ``img_name`` / ``content_type`` / ``q_lang``,
PathVQA's ``image``). Images are looked for next to the question file and in its
``images/``, ``imgs/`` or ``VQA_RAD Image Folder/`` subfolders, never outside the folder.

Scoring uses :func:`medgym.environments.rewards.score_answer`: closed yes/no questions as
``yesno``; every other answer as ``open`` (normalised exact match: lower case, no
punctuation, no articles). These cases carry no expert trace (``expert_calls == []``).
``case(seed)`` is record ``seed % n``, so seeds ``0..n-1`` walk the whole dataset.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medgym.environments.case import Case
from medgym.environments.realdata.loaders import read_image, safe_path
from medgym.tools.base import Study

log = logging.getLogger(__name__)

ALIASES: dict[str, tuple[str, ...]] = {
    "image": ("image", "image_name", "img_name", "image_path", "img_path", "image_id", "img"),
    "question": ("question", "sent", "query"),
    "answer": ("answer", "answers", "label", "gt_answer"),
    "answer_type": ("answer_type", "answer_type_en", "type"),
    "kind": ("question_type", "content_type", "qtype", "category"),
    "lang": ("q_lang", "lang", "language"),
    "modality": ("modality", "image_modality"),
    "qid": ("qid", "id", "question_id"),
}
IMAGE_FOLDERS = ("", "images", "imgs", "image", "Images", "VQA_RAD Image Folder", "VQA_RAD_Image_Folder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".dcm", ".nii.gz")
QUESTION_SUFFIXES = (".json", ".jsonl", ".csv")
SKIP_FILES = ("dataset.json",)
# Question kinds of VQA-RAD (PRES, SIZE ...) and SLAKE (Organ, Size ...) mapped onto the project's stages.
STAGE_OF_KIND = {
    "size": "measurement",
    "count": "measurement",
    "quantity": "measurement",
    "pos": "visual_reasoning",
    "position": "visual_reasoning",
    "kg": "medical_reasoning",
}
MODALITY_WORDS = {"mri": "MR", "mr": "MR", "ct": "CT", "x-ray": "X-ray", "xray": "X-ray", "us": "US"}


class VQARecord(BaseModel):
    """One question as it enters the project (validated at the file boundary)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description="Image path relative to the question file or its image folder.")
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    closed: bool = Field(description="Closed-ended (yes/no or a fixed set) rather than free text.")
    stage: Literal["recognition", "measurement", "visual_reasoning", "medical_reasoning"] = "recognition"
    kind: str = "question"
    modality: str | None = None
    qid: str
    file: str = Field(description="The question file this record came from.")


def _pick(row: dict[str, Any], field: str) -> Any:
    for key in ALIASES[field]:
        if key in row and row[key] not in (None, ""):
            return row[key]
    return None


def _records_in(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".csv":
            return list(csv.DictReader(text.splitlines()))
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ValueError(f"cannot read question file {path}: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("data") or data.get("questions") or data.get("annotations")
    if not isinstance(data, list):
        raise ValueError(f"cannot read question file {path}: expected a list of question records")
    return data


def parse_record(row: Any, file: Path, index: int) -> VQARecord | None:
    """A validated record, or None for rows this source skips (another language)."""
    if not isinstance(row, dict):
        raise ValueError(f"{file} record {index}: expected an object, got {type(row).__name__}")
    lang = _pick(row, "lang")
    if lang is not None and str(lang).lower() not in ("en", "english"):
        return None
    answer = _pick(row, "answer")
    if isinstance(answer, list):  # some releases keep several reference answers: the first is canonical
        answer = answer[0] if answer else None
    answer = None if answer is None else str(answer).strip()
    kind_raw = _pick(row, "answer_type")
    yes_no = (answer or "").lower() in ("yes", "no")
    closed = str(kind_raw).strip().upper() == "CLOSED" if kind_raw is not None else yes_no
    kind = str(_pick(row, "kind") or "question").strip()
    first_kind = re.split(r"[,\s/]+", kind.lower())[0]
    modality = _pick(row, "modality")
    image = _pick(row, "image")
    try:
        return VQARecord(
            image=str(image) if image is not None else "",
            question=str(_pick(row, "question") or "").strip(),
            answer=answer or "",
            closed=closed,
            stage=STAGE_OF_KIND.get(first_kind, "recognition"),
            kind=kind,
            modality=MODALITY_WORDS.get(str(modality).lower(), str(modality)) if modality else None,
            qid=str(_pick(row, "qid") or index),
            file=file.name,
        )
    except ValidationError as exc:
        missing = ", ".join(str(e["loc"][0]) for e in exc.errors())
        raise ValueError(
            f"{file} record {index}: missing or empty {missing}; each record needs an image, a question and an answer"
        ) from exc


class VQASource:
    """Questions and answers from a VQA dataset folder; no expert traces (see module docstring)."""

    name = "vqa"

    def __init__(self, path: str | Path, lang: str = "en"):
        given = Path(path)
        if not given.exists():
            raise ValueError(f"vqa: {path} does not exist; give a folder or a .json/.jsonl/.csv question file")
        self.root = (given if given.is_dir() else given.parent).resolve()
        files = [given.resolve()] if given.is_file() else self._question_files()
        if not files:
            raise ValueError(f"vqa: no question files (.json, .jsonl, .csv) in {self.root}")
        self.records: list[tuple[Path, VQARecord]] = []
        for file in files:
            file = safe_path(self.root, file)
            for i, row in enumerate(_records_in(file)):
                record = parse_record(row, file, i)
                if record is not None:
                    self.records.append((file, record))
        if not self.records:
            raise ValueError(f"vqa: the question files in {self.root} hold no {lang} questions")

    def _question_files(self) -> list[Path]:
        return sorted(
            p
            for p in self.root.iterdir()
            if p.is_file() and p.suffix.lower() in QUESTION_SUFFIXES and p.name not in SKIP_FILES
        )

    def image_path(self, file: Path, image: str) -> Path:
        """The record's image inside the data folder (extension added when the record omits it)."""
        names = [image] if Path(image).suffix else [image + ext for ext in IMAGE_EXTENSIONS]
        for folder in IMAGE_FOLDERS:
            for name in names:
                candidate = file.parent / folder / name
                if candidate.exists() or candidate.is_symlink():
                    return safe_path(self.root, candidate)  # refuses links and ../ that leave the folder
        if ".." in Path(image).parts or Path(image).is_absolute():
            safe_path(self.root, file.parent / image)  # raises the path error, not "not found"
        raise ValueError(f"vqa: image {image!r} of {file.name} not found next to it or in {IMAGE_FOLDERS[1:]}")

    def __len__(self) -> int:
        return len(self.records)

    def case(self, seed: int) -> Case:
        file, rec = self.records[seed % len(self.records)]
        image, spacing, meta = read_image(self.image_path(file, rec.image))
        is_picture = meta.get("format") == "picture"
        modality = rec.modality or meta.get("dicom", {}).get("Modality") or "unknown"
        if is_picture:
            # A JPEG of a CT holds grey levels, not HU: the name keeps tools from reading them as HU.
            modality = f"{modality} picture" if modality != "unknown" else "picture"
        meta.update(dataset_file=rec.file, question_kind=rec.kind)
        study = Study(image=image, spacing=spacing, modality=modality, meta=meta)
        yes_no = rec.closed and rec.answer.lower() in ("yes", "no")
        return Case(
            case_id=f"vqa-{re.sub(r'[^A-Za-z0-9_.-]+', '_', rec.qid)}-{seed}",
            source=self.name,
            seed=seed,
            stage=rec.stage,
            template=f"vqa_{'closed' if rec.closed else 'open'}",
            question=rec.question,
            answer_type="yesno" if yes_no else "open",
            answer=rec.answer.lower() if yes_no else rec.answer,
            study=study,
            expert_calls=[],
        )


__all__ = ["VQARecord", "VQASource", "parse_record"]
