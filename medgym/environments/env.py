"""MedVQAEnv: a Gymnasium environment where an action is a model's text turn.

An episode is one case. ``reset`` shows the question and the image(s); each ``step``
takes the model's turn, runs its ``<tool_call>``s through the one call runner
(:func:`medgym.environments.runner.run_calls`; observation: the tools' text and images) or
scores its ``<answer>`` (reward from :mod:`medgym.environments.rewards`, episode ends). A
malformed turn gets an error observation and a small format penalty; the env never raises on
model output. The step budget is Gymnasium's ``TimeLimit`` (set at registration).
Observations have fixed shapes so vector envs can batch them: up to ``max_images`` pictures,
letterboxed into ``image_size`` squares, plus their count; the full-resolution pictures are in
``info["images"]`` and the call records in ``info["calls"]`` (what
:func:`medgym.environments.contract.tool_messages` turns into a policy's tool turns).

``tool_mode`` is ``"predicted"`` (default: no tool reads ground truth) or ``"oracle"`` (tools
may read the case's structures: an upper bound); it is recorded in every trace.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from medgym.environments.case import Case
from medgym.environments.contract import (
    DEFAULT_TOOL_MODE,
    NOTE_IMAGES_DROPPED,
    check_tool_mode,
    describe_study,
    prompt_hash,
    question_images,
    question_text,
    system_prompt,
    tool_schemas,
)
from medgym.environments.parsing import parse_action, parse_box
from medgym.environments.recorder import EpisodeRecorder, RunSettings
from medgym.environments.rewards import FORMAT_PENALTY, box_iou, mask_iou, score_parts, total_reward
from medgym.environments.runner import CallRecord, run_calls, utf8
from medgym.environments.sources import TaskSource, make_source
from medgym.environments.templates import lesion_union
from medgym.tools import ToolContext
from medgym.tools.base import mask_box
from medgym.tools.imaging import resize_rgb

CHARSET = frozenset(string.printable)
MAX_TEXT = 8192
MAX_ACTION = 4096
ERR_NOT_TEXT = "Format error: the action must be a string holding the model's turn."

__all__ = [
    "MedVQAEnv",
    "describe_study",
    "letterbox",
    "prompt_hash",
    "question_images",
    "question_text",
    "sanitize",
    "system_prompt",
    "tool_schemas",
]


def sanitize(text: str, limit: int = MAX_TEXT) -> str:
    """Keep observation text inside the Text space: printable ASCII, bounded length."""
    clean = "".join(c if c in CHARSET else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """Fit a picture into a size x size square (top-left aligned, black padding, never enlarged)."""
    out = np.zeros((size, size, 3), dtype=np.uint8)
    letterbox_into(out, img)
    return out


def letterbox_into(out: np.ndarray, img: np.ndarray) -> None:
    """:func:`letterbox` into a zeroed ``(size, size, 3)`` array, without a copy in between."""
    size = out.shape[0]
    h, w = img.shape[:2]
    scale = min(size / h, size / w)
    if scale < 1.0:  # only shrink: a smaller picture keeps its own pixels
        img = resize_rgb(img, (max(1, round(w * scale)), max(1, round(h * scale))))
    out[: img.shape[0], : img.shape[1]] = img if img.ndim == 3 else img[..., None]


class MedVQAEnv(gym.Env):
    """Visual question answering with tools on medical images (see module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1}

    def __init__(
        self,
        source: str | TaskSource = "phantom",
        image_size: int = 256,
        max_images: int = 4,
        segmenter: str = "medsam",
        sam_checkpoint: str | None = None,
        tool_mode: str = DEFAULT_TOOL_MODE,
        record_to: str | Path | None = None,
        model_id: str = "unknown",
        render_mode: str | None = None,
        **source_kwargs: Any,
    ):
        self.tool_mode = check_tool_mode(tool_mode)
        if isinstance(source, str):
            self.source = make_source(source, tool_mode=self.tool_mode, **source_kwargs)
        else:
            self.source = source
        self.image_size = image_size
        self.max_images = max_images
        # Recorded in traces so replay can rebuild the source (only known when built from a spec).
        self.settings = RunSettings(
            source_spec=source if isinstance(source, str) else None,
            source_config=dict(source_kwargs) if isinstance(source, str) else {},
            segmenter=segmenter,
            sam_checkpoint=sam_checkpoint,
            tool_mode=self.tool_mode,
            model_id=model_id,
        )
        self.render_mode = render_mode
        self.observation_space = spaces.Dict(
            {
                "text": spaces.Text(MAX_TEXT, min_length=0, charset=CHARSET),
                "images": spaces.Box(0, 255, (max_images, image_size, image_size, 3), np.uint8),
                "n_images": spaces.Discrete(max_images + 1),
            }
        )
        self.action_space = spaces.Text(MAX_ACTION, min_length=0, charset=CHARSET)
        self.writer = None
        if record_to is not None:
            from medgym.traces import TraceWriter

            self.writer = TraceWriter(record_to)
        self.case: Case | None = None
        self.ctx: ToolContext | None = None
        self.recorder: EpisodeRecorder | None = None
        self._done = True

    @property
    def segmenter(self) -> str:
        return self.settings.segmenter

    @property
    def model_id(self) -> str:
        return self.settings.model_id

    # ------------------------------------------------------------ observations

    def _observe(self, text: str, images: list[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
        shown = images[: self.max_images]
        if len(images) > len(shown):
            text += "\n" + NOTE_IMAGES_DROPPED.format(n=len(images) - len(shown), k=self.max_images)
        # A fresh stack each step (users keep observations); zeros come from calloc, so it costs little.
        stack = np.zeros(self.observation_space["images"].shape, dtype=np.uint8)
        for i, img in enumerate(shown):
            letterbox_into(stack[i], img)
        return {"text": sanitize(text), "images": stack, "n_images": len(shown)}, shown

    def question_images(self) -> list[np.ndarray]:
        assert self.case is not None
        return question_images(self.case)

    def question_text(self) -> str:
        assert self.case is not None
        return question_text(self.case, self.tool_mode)

    # ------------------------------------------------------------ gym API

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._close_trace(truncated=True)
        options = options or {}
        if "case" in options:
            self.case = options["case"]
        else:
            case_seed = int(options.get("case_seed", self.np_random.integers(2**31 - 1)))
            self.case = self.source.case(case_seed)
        assert self.case is not None
        self.ctx = ToolContext(
            study=self.case.study,
            prior=self.case.prior,
            segmenter=self.settings.segmenter,
            sam_checkpoint=self.settings.sam_checkpoint,
            tool_mode=self.tool_mode,
        )
        self._done = False
        self._tool_calls_ok = 0
        self._steps = 0
        self._format_errors = 0
        self._prompt_boxes: list[list[float]] = []
        images = self.question_images()
        text = self.question_text()
        obs, shown = self._observe(text, images)
        if self.writer is not None:
            settings = self.settings
            if self.spec is not None and settings.env_id != self.spec.id:
                settings = self.settings = RunSettings(**{**settings.__dict__, "env_id": self.spec.id})
            self.recorder = EpisodeRecorder.for_case(self.writer, self.case, settings, text, shown)
        return obs, self._info(shown)

    def _info(self, images: list[np.ndarray], **extra: Any) -> dict[str, Any]:
        assert self.case is not None
        return {
            "case_id": self.case.case_id,
            "stage": self.case.stage,
            "template": self.case.template,
            "images": images,
            **extra,
        }

    def step(self, action: Any):
        if self._done or self.case is None or self.ctx is None:
            raise gym.error.ResetNeeded("call reset() before step(): the episode has ended")
        self._steps += 1
        if not isinstance(action, str):
            return self._format_error(ERR_NOT_TEXT, repr(action)[:200])
        action = utf8(action)  # no tokenizer emits lone surrogates, and a trace could not store them
        parsed = parse_action(action)
        if parsed.error is not None:
            return self._format_error(parsed.error, action)
        if parsed.calls:
            return self._run_calls(parsed.calls, action)
        return self._answer(action, parsed.answer, parsed.box)

    def _format_error(self, message: str, raw: str):
        self._format_errors += 1
        obs, shown = self._observe(message, [])
        if self.recorder is not None:
            self.recorder.step(raw, [], reward=FORMAT_PENALTY, format_error=message)
        return obs, FORMAT_PENALTY, False, False, self._info(shown, format_error=message)

    def _run_calls(self, calls: list[dict[str, Any]], raw: str):
        assert self.ctx is not None
        records, note = run_calls(calls, self.ctx, limit=None)
        self._tool_calls_ok += sum(not r.error for r in records)
        self._prompt_boxes += prompt_boxes(records)
        texts = [r.observation for r in records] + ([note] if note else [])
        obs, shown = self._observe("\n".join(texts), [img for r in records for img in r.images])
        if self.recorder is not None:
            self.recorder.step(raw, records, reward=0.0)
        errors = sum(r.error for r in records)
        return obs, 0.0, False, False, self._info(shown, tool_calls=len(calls), tool_errors=errors, calls=records)

    def _answer(self, raw: str, answer: str | None, box: list[float] | None):
        assert self.case is not None and self.ctx is not None
        parts = score_parts(raw, self.case.reward_columns(), self._tool_calls_ok)
        reward = total_reward(parts)
        self._done = True
        extra: dict[str, Any] = {
            "answer": answer,
            "box": box,
            "reward_parts": parts,
            "correct": parts["answer"] == 1.0,
            "tool_calls_ok": self._tool_calls_ok,
            "format_errors": self._format_errors,
        }
        if self.case.answer_box is not None:
            # Grounding on the model's own boxes: the answered box, and each box it prompted segment with.
            extra["box_iou"] = box_iou(box, self.case.answer_box) if box is not None else 0.0
        if self.ctx.masks and self.case.answer_box is not None:
            last, truth = list(self.ctx.masks.values())[-1], lesion_union(self.case.study)
            if last.shape == truth.shape:  # a mask of a prior study of another size is not comparable
                extra["mask_iou"] = mask_iou(last, truth)
        if self._prompt_boxes:
            extra["prompt_iou"] = float(np.mean(prompt_ious(self._prompt_boxes, self.case.study, self.case.prior)))
        dice = mask_dice(self.ctx.masks, self.case.study, self.case.prior)
        if dice:
            extra["mask_dice"] = float(np.mean(dice))
        if self.recorder is not None:
            self.recorder.step(raw, [], reward=reward, answer=answer, box=box)
        self._close_trace(truncated=False, answer=answer, box=box, parts=parts, reward=reward)
        obs, shown = self._observe("Answer received.", [])
        return obs, reward, True, False, self._info(shown, **extra)

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array" or self.case is None:
            return None
        return self.question_images()[0]

    def close(self) -> None:
        self._close_trace(truncated=True)
        super().close()

    def _close_trace(self, truncated: bool, parts: dict[str, Any] | None = None, **fields: Any) -> None:
        if self.recorder is not None:
            self.recorder.close(truncated=truncated, score=parts, **fields)
            self.recorder = None


CHOSEN_BOX = re.compile(r"segmented candidate \d+ box \[([^\]]*)\]")


def segment_prompt_box(arguments: dict[str, Any], text: str) -> list[float] | None:
    """A segment call's prompt box: the box it wrote, or the detect candidate's it chose by number (the result
    names that box)."""
    box = arguments.get("box")
    if box is None and arguments.get("candidate") is not None:
        chosen = CHOSEN_BOX.search(text or "")
        box = parse_box(f"[{chosen.group(1)}]") if chosen else None
    return box


def prompt_boxes(records: list[CallRecord]) -> list[list[float]]:
    """The boxes a model wrote into its segment prompts (what grounding on its own boxes scores); a detect
    candidate chosen by number counts its box, as the segment result names it."""
    out = []
    for r in records:
        if r.name != "segment" or r.error or not isinstance(r.arguments, dict):
            continue
        box = segment_prompt_box(r.arguments, r.text)
        if isinstance(box, list) and len(box) == 4:
            out.append([float(v) for v in box])
    return out


def mask_dice(masks: dict[str, np.ndarray], study, prior=None) -> list[float]:
    """Dice of each mask made this episode against the ground-truth structure it overlaps most.

    Scoring only: the structures (lesion instances and organs) never reach a tool in predicted mode.
    """
    out = []
    for mask in masks.values():
        best = 0.0
        for s in (study, prior):
            if s is None or s.image.shape != mask.shape:
                continue
            for name, truth in s.structures.items():
                if name in ("lesion", "body") or not truth.any():
                    continue
                inter = np.logical_and(mask, truth).sum()
                if inter:
                    best = max(best, 2.0 * inter / (mask.sum() + truth.sum()))
        out.append(float(best))
    return out


def _truth_boxes(study, prior=None) -> list[list[float]]:
    boxes = []
    for s in (study, prior):
        if s is None:
            continue
        for name, truth in s.structures.items():
            if name in ("lesion", "body") or not truth.any():
                continue
            boxes.append(mask_box(truth if truth.ndim == 2 else truth.any(axis=0)))
    return boxes


def prompt_ious(boxes: list[list[float]], study, prior=None) -> list[float]:
    """Grounding of the model's own prompt boxes: each one's IoU with the ground-truth box it fits best."""
    truth = _truth_boxes(study, prior)
    return [max((box_iou(b, t) for t in truth), default=0.0) for b in boxes]
