"""VQASource on tiny VQA-RAD, SLAKE and PathVQA-style folders written here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgym.environments.evaluate import evaluate
from medgym.environments.policies import ExpertPolicy
from medgym.environments.realdata.vqa import VQASource
from medgym.environments.rewards import score_answer


def picture(path: Path, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 48), value, np.uint8)).save(path)


def vqa_rad(root: Path) -> Path:
    picture(root / "VQA_RAD Image Folder" / "synpic100.jpg")
    rows = [
        {"qid": 1, "image_name": "synpic100.jpg", "question": "Is there a pneumothorax?", "answer": "No",
         "answer_type": "CLOSED", "question_type": "PRES"},
        {"qid": 2, "image_name": "synpic100.jpg", "question": "Where is the mass?", "answer": "Left upper lobe",
         "answer_type": "OPEN", "question_type": "POS"},
        {"qid": 3, "image_name": "synpic100.jpg", "question": "How many nodules?", "answer": "2",
         "answer_type": "OPEN", "question_type": "COUNT"},
    ]  # fmt: skip
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    return root


def slake(root: Path) -> Path:
    picture(root / "imgs" / "xmlab1" / "source.jpg")
    rows = [
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Which organ is abnormal?", "answer": "Liver",
         "q_lang": "en", "answer_type": "OPEN", "content_type": "Organ", "modality": "CT", "qid": 10},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "哪个器官异常?", "answer": "肝脏",
         "q_lang": "zh", "answer_type": "OPEN", "content_type": "Organ", "modality": "CT", "qid": 11},
        {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Does the image contain the lung?",
         "answer": "Yes", "q_lang": "en", "answer_type": "CLOSED", "content_type": "KG", "modality": "CT", "qid": 12},
    ]  # fmt: skip
    (root / "train.json").write_text(json.dumps(rows, ensure_ascii=False))
    return root


def pathvqa(root: Path) -> Path:
    picture(root / "images" / "train_0001.png")
    with (root / "qa.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "question", "answer"])
        w.writeheader()
        w.writerow({"image": "train_0001", "question": "Is this tissue necrotic?", "answer": "yes"})
        w.writerow({"image": "train_0001", "question": "What stain is used?", "answer": "the H&E stain"})
    return root


def test_vqa_rad_layout(tmp_path: Path) -> None:
    source = VQASource(vqa_rad(tmp_path))
    cases = [source.case(i) for i in range(3)]
    assert [c.answer_type for c in cases] == ["yesno", "open", "open"]
    assert [c.stage for c in cases] == ["recognition", "visual_reasoning", "measurement"]
    assert all(c.expert_calls == [] for c in cases)
    assert cases[0].study.image.shape == (32, 48) and cases[0].study.spacing == (1.0, 1.0)
    assert score_answer("No.", None, cases[0].answer, "yesno") == 1.0
    assert score_answer("the left upper lobe", None, cases[1].answer, "open") == 1.0
    assert score_answer("right upper lobe", None, cases[1].answer, "open") == 0.0


def test_slake_layout_keeps_english(tmp_path: Path) -> None:
    source = VQASource(slake(tmp_path))
    assert len(source) == 2
    organ, kg = source.case(0), source.case(1)
    assert organ.answer == "Liver" and organ.study.modality == "CT picture"  # grey levels, not HU
    assert kg.stage == "medical_reasoning" and kg.answer == "yes"


def test_pathvqa_csv_and_expert_scores(tmp_path: Path) -> None:
    root = pathvqa(tmp_path)
    source = VQASource(root / "qa.csv")
    assert [source.case(i).answer_type for i in range(2)] == ["yesno", "open"]
    summary = evaluate(ExpertPolicy(), source=f"vqa:{root / 'qa.csv'}", n=2)  # through make_source
    assert summary["accuracy"] == 1.0 and summary["tool_calls"] == 0


def test_bad_records_and_escapes(tmp_path: Path) -> None:
    (tmp_path / "q.json").write_text(json.dumps([{"image": "x.png", "question": "?"}]))
    with pytest.raises(ValueError, match=r"q.json record 0: missing or empty answer"):
        VQASource(tmp_path)
    root = tmp_path / "d"
    picture(tmp_path / "outside.png")
    root.mkdir()
    (root / "q.json").write_text(json.dumps([{"image": "../outside.png", "question": "?", "answer": "no"}]))
    with pytest.raises(ValueError, match="leaves the data folder"):
        VQASource(root).case(0)
