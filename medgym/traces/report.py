"""HTML reports of trace files: one self-contained page per file.

Per episode: the question and its image(s) with the ground-truth box (green) and the
answer's box (red) drawn on, each step's model text and tool calls with their results
and images (crops, mask overlays), the answer against the ground truth, and the reward
parts. Images are inlined as base64 ``data:`` URLs from the trace's ``images/`` folder,
so the page needs nothing else (no CDN, no server). Filters (plain JS) show wrong
answers only, failed tools only, or one stage.

All text goes through jinja's autoescape: model text and tool text are untrusted.
The template is package data: ``medgym/traces/report.html.jinja``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from PIL import Image, ImageDraw

from medgym.traces.schema import TraceEpisode
from medgym.traces.score import evidence_status, is_correct, is_scored, score_episodes
from medgym.traces.store import ImageStore, read_traces

log = logging.getLogger(__name__)

TRUTH_COLOUR = (40, 220, 90)  # ground-truth box
ANSWER_COLOUR = (255, 40, 40)  # the answer's box
TEMPLATE = "report.html.jinja"


@cache
def _template() -> jinja2.Template:
    text = (resources.files("medgym.traces") / TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.from_string(text)


def png_data_url(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def draw_boxes(img: np.ndarray, truth: list[float] | None, answer: list[float] | None) -> np.ndarray:
    """The picture with the ground-truth box (green) and the answer's box (red), 2 px outlines."""
    pil = Image.fromarray(img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)).convert("RGB")
    draw = ImageDraw.Draw(pil)
    for box, colour in ((truth, TRUTH_COLOUR), (answer, ANSWER_COLOUR)):
        if box is None or len(box) != 4:
            continue
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            continue
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=2)
    return np.asarray(pil)


class ImageInliner:
    """Data URLs of stored images, read once each; a missing or corrupt file gives None."""

    def __init__(self, store: ImageStore):
        self.store = store
        self._urls: dict[str, str | None] = {}

    def url(self, digest: str | None) -> str | None:
        if digest is None:
            return None
        if digest not in self._urls:
            path = self.store.path(digest)
            try:
                raw = path.read_bytes()
                Image.open(io.BytesIO(raw)).verify()
            except (OSError, ValueError) as exc:
                log.warning("image %s not shown: %s", digest[:12], exc)
                self._urls[digest] = None
            else:
                self._urls[digest] = "data:image/png;base64," + base64.b64encode(raw).decode("ascii")
        return self._urls[digest]

    def with_boxes(self, digest: str | None, truth: list[float] | None, answer: list[float] | None) -> str | None:
        if digest is None or self.url(digest) is None:
            return None
        if truth is None and answer is None:
            return self.url(digest)
        return png_data_url(draw_boxes(self.store.get(digest), truth, answer))


def _fmt_score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def episode_view(ep: TraceEpisode, number: int, images: ImageInliner) -> dict[str, Any]:
    """What the template shows of one episode (plain strings and data URLs)."""
    h = ep.header
    failed = sum(call.error for step in ep.steps for call in step.calls)
    steps = []
    for step in ep.steps:
        calls = []
        for call in step.calls:
            calls.append(
                {
                    "name": call.name,
                    "arguments": json.dumps(call.arguments),
                    "text": call.text,
                    "error": call.error,
                    "seconds": f"{call.seconds:.3f}",
                    "images": [
                        {"url": images.url(d), "hash": d[:12]}
                        for d in call.images  # crops, mask overlays
                    ],
                }
            )
        steps.append(
            {
                "index": step.index,
                "model_text": step.model_text,
                "calls": calls,
                "format_error": step.format_error,
                "reward": _fmt_score(step.reward),
            }
        )
    question_images = [
        {
            "label": "current study" if h.prior_image else "question image",
            "url": images.with_boxes(h.image, h.answer_box, ep.final_box),
            "hash": (h.image or "")[:12],
        }
    ]
    if h.prior_image:
        question_images.append({"label": "prior study", "url": images.url(h.prior_image), "hash": h.prior_image[:12]})
    return {
        "number": number,
        "episode_id": h.episode_id,
        "case_id": h.case_id,
        "source": h.source,
        "stage": h.stage,
        "template": h.template,
        "model_id": h.model_id,
        "tool_mode": h.tool_mode or "oracle",
        "question": h.question,
        "answer": h.answer,
        "answer_box": json.dumps(h.answer_box) if h.answer_box is not None else None,
        "final_answer": ep.final_answer,
        "final_box": json.dumps(ep.final_box) if ep.final_box is not None else None,
        "correct": is_correct(ep) if is_scored(ep) else None,  # None: a chat question, no known answer
        "truncated": ep.truncated,
        "failed_tools": failed,
        "evidence": evidence_status(ep),
        "score": [(k, _fmt_score(v)) for k, v in ep.score.items()],
        "reward": _fmt_score(ep.reward),
        "question_images": question_images,
        "has_boxes": h.answer_box is not None or ep.final_box is not None,
        "steps": steps,
    }


def render_report(path: Path | str, title: str | None = None) -> str:
    """The HTML page of a trace file."""
    path = Path(path)
    traces = read_traces(path)
    images = ImageInliner(ImageStore(path.parent / "images", create=False))
    episodes = [episode_view(ep, i, images) for i, ep in enumerate(traces.episodes, start=1)]
    scores = score_episodes(traces.episodes, traces.problems)
    return _template().render(
        title=title or f"medgym traces: {path.name}",
        path=str(path),
        episodes=episodes,
        scores=scores,
        problems=traces.problems,
        stages=list(scores["by_stage"]),
        truth_colour=f"rgb{TRUTH_COLOUR}",
        answer_colour=f"rgb{ANSWER_COLOUR}",
    )


def write_report(path: Path | str, out: Path | str, title: str | None = None) -> Path:
    """Render a trace file's report to ``out`` (written whole, then moved into place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_report(path, title), encoding="utf-8")
    tmp.replace(out)
    return out
