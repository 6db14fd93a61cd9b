"""MedVQAEnv: a Gymnasium environment where an action is a model's text turn.

An episode is one case. ``reset`` shows the question and the image(s); each ``step``
takes the model's turn, runs its ``<tool_call>``s (observation: the tools' text and
images) or scores its ``<answer>`` (reward from :mod:`medgym.environments.rewards`,
episode ends). A malformed turn gets an error observation and a small format penalty;
the env never raises on model output. The step budget is Gymnasium's ``TimeLimit``
(set at registration). Observations have fixed shapes so vector envs can batch them:
up to ``max_images`` pictures, letterboxed into ``image_size`` squares, plus their count;
the full-resolution pictures are in ``info["images"]``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import string
import time
import uuid
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from medgym import prompts
from medgym.environments.case import Case
from medgym.environments.parsing import parse_action
from medgym.environments.rewards import FORMAT_PENALTY, box_iou, mask_iou, score_parts, total_reward
from medgym.environments.sources import TaskSource, make_source
from medgym.environments.templates import lesion_union
from medgym.tools import TOOLS, Study, ToolContext, run_tool
from medgym.tools.imaging import resize_rgb, to_display

CHARSET = frozenset(string.printable)
MAX_TEXT = 8192
MAX_ACTION = 4096
ERR_NOT_TEXT = "Format error: the action must be a string holding the model's turn."
NOTE_IMAGES_DROPPED = "({n} more image(s) not shown: at most {k} per turn.)"


def _medgym_version() -> str | None:
    try:
        return importlib.metadata.version("medgym")
    except importlib.metadata.PackageNotFoundError:
        return None


def tool_schemas() -> list[dict[str, Any]]:
    return [spec.json_schema() for spec in TOOLS.values()]


def system_prompt() -> str:
    """The system prompt with every tool's schema (``prompts/system.jinja``)."""
    return prompts.render("system", tools=tool_schemas())


def prompt_hash() -> str:
    return hashlib.sha256(system_prompt().encode()).hexdigest()[:16]


def sanitize(text: str, limit: int = MAX_TEXT) -> str:
    """Keep observation text inside the Text space: printable ASCII, bounded length."""
    clean = "".join(c if c in CHARSET else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """Fit a picture into a size x size square (top-left aligned, black padding, never enlarged)."""
    h, w = img.shape[:2]
    scale = min(size / h, size / w)
    if scale < 1.0:  # only shrink: a smaller picture keeps its own pixels
        img = resize_rgb(img, (max(1, round(w * scale)), max(1, round(h * scale))))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    out[: img.shape[0], : img.shape[1]] = img
    return out


def describe_study(study: Study, has_prior: bool = False) -> list[str]:
    """What the model is told about the picture: size, spacing, volume, nameable structures."""
    h, w = study.shape2d
    row_mm, col_mm = study.spacing2d
    desc = f"{study.modality} image, {w} x {h} pixels, pixel spacing {col_mm:.3f} x {row_mm:.3f} mm"
    if not study.meta.get("spacing_known", True):
        desc += " (not given in the file: assumed, so sizes are in pixels)"
    if study.is_3d:
        desc += f"; a volume of {study.image.shape[0]} slices {study.spacing[0]:g} mm apart, slice {study.display_slice} shown"
    lines = [desc + "."]
    if has_prior:
        lines.append("Image 1 is the current study, image 2 the prior study.")
    names = [n for n in study.structures if not n.startswith("lesion_") and n != "empty"]
    if names:
        lines.append("Structures segment can name: " + ", ".join(names) + ".")
    return lines


def question_text(case: Case) -> str:
    """The first observation's text: the study described, then the question with its answer format."""
    return "\n".join([*describe_study(case.study, case.prior is not None), case.prompt()])


def question_images(case: Case) -> list[np.ndarray]:
    """The pictures shown with the question: the current study, then the prior if any."""
    pics = [to_display(case.study.plane(), case.study.modality)]
    if case.prior is not None:
        pics.append(to_display(case.prior.plane(), case.prior.modality))
    return pics


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
        record_to: str | Path | None = None,
        model_id: str = "unknown",
        render_mode: str | None = None,
        **source_kwargs: Any,
    ):
        self.source = make_source(source, **source_kwargs) if isinstance(source, str) else source
        # Recorded in traces so replay can rebuild the source (only known when built from a spec).
        self.source_spec = source if isinstance(source, str) else None
        self.source_kwargs = dict(source_kwargs) if isinstance(source, str) else {}
        self.image_size = image_size
        self.max_images = max_images
        self.segmenter = segmenter
        self.sam_checkpoint = sam_checkpoint
        self.model_id = model_id
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
        self._trace: Any = None
        self._done = True

    # ------------------------------------------------------------ observations

    def _observe(self, text: str, images: list[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
        shown = images[: self.max_images]
        if len(images) > len(shown):
            text += "\n" + NOTE_IMAGES_DROPPED.format(n=len(images) - len(shown), k=self.max_images)
        stack = np.zeros(self.observation_space["images"].shape, dtype=np.uint8)
        for i, img in enumerate(shown):
            stack[i] = letterbox(img, self.image_size)
        return {"text": sanitize(text), "images": stack, "n_images": len(shown)}, shown

    def question_images(self) -> list[np.ndarray]:
        assert self.case is not None
        return question_images(self.case)

    def question_text(self) -> str:
        assert self.case is not None
        return question_text(self.case)

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
            segmenter=self.segmenter,
            sam_checkpoint=self.sam_checkpoint,
        )
        self._done = False
        self._tool_calls_ok = 0
        self._steps = 0
        self._format_errors = 0
        images = self.question_images()
        obs, shown = self._observe(self.question_text(), images)
        self._start_trace(shown)
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
        parsed = parse_action(action)
        if parsed.error is not None:
            return self._format_error(parsed.error, action)
        if parsed.calls:
            return self._run_calls(parsed.calls, action)
        return self._answer(action, parsed.answer, parsed.box)

    def _format_error(self, message: str, raw: str):
        self._format_errors += 1
        obs, shown = self._observe(message, [])
        self._record_step(raw, [], reward=FORMAT_PENALTY, format_error=message)
        return obs, FORMAT_PENALTY, False, False, self._info(shown, format_error=message)

    def _run_calls(self, calls: list[dict[str, Any]], raw: str):
        assert self.ctx is not None
        texts, images, records = [], [], []
        for call in calls:
            start = time.perf_counter()
            result = run_tool(TOOLS, call["name"], call["arguments"], self.ctx)
            seconds = time.perf_counter() - start
            self._tool_calls_ok += 0 if result.error else 1
            texts.append(f"[{call['name']}] {result.text}")
            images.extend(result.images)
            records.append((call, result, seconds))
        obs, shown = self._observe("\n".join(texts), images)
        self._record_step(raw, records, reward=0.0)
        errors = sum(r.error for _, r, _ in records)
        return obs, 0.0, False, False, self._info(shown, tool_calls=len(calls), tool_errors=errors)

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
            extra["box_iou"] = box_iou(box, self.case.answer_box) if box is not None else 0.0
        if self.ctx.masks and self.case.answer_box is not None:
            last = list(self.ctx.masks.values())[-1]
            extra["mask_iou"] = mask_iou(last, lesion_union(self.case.study))
        self._record_step(raw, [], reward=reward, answer=answer, box=box)
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

    # ------------------------------------------------------------ traces

    def _start_trace(self, images: list[np.ndarray]) -> None:
        if self.writer is None:
            return
        from medgym.traces import TraceEpisode, TraceHeader

        case = self.case
        assert case is not None
        store = self.writer.images
        header = TraceHeader(
            episode_id=uuid.uuid4().hex,
            env_id=self.spec.id if self.spec else None,
            source=case.source,
            seed=case.seed,
            case_id=case.case_id,
            stage=case.stage,
            template=case.template,
            question=self.question_text(),
            answer=case.answer,
            answer_type=case.answer_type,
            choices=case.choices,
            answer_box=case.answer_box,
            image=store.put(images[0]),
            prior_image=store.put(images[1]) if len(images) > 1 else None,
            model_id=self.model_id,
            prompt_hash=prompt_hash(),
            tool_versions={name: spec.version for name, spec in TOOLS.items()},
            source_spec=self.source_spec,
            source_config=json.loads(json.dumps(self.source_kwargs, default=str)),
            study_hash=case.study.content_hash(),
            segmenter=self.segmenter,
            sam_checkpoint=self.sam_checkpoint,
            unit=case.unit,
            tolerance=case.tolerance,
            abs_tolerance=case.abs_tolerance,
            medgym_version=_medgym_version(),
        )
        self._trace = TraceEpisode(header=header)

    def _record_step(
        self, raw: str, records: list[tuple[dict[str, Any], Any, float]], reward: float, **fields: Any
    ) -> None:
        if self._trace is None or self.writer is None:
            return
        from medgym.traces import ToolCallRecord, TraceStep

        calls = [
            ToolCallRecord(
                name=str(call["name"]),
                arguments=call["arguments"],
                tool_version=TOOLS[call["name"]].version if call["name"] in TOOLS else None,
                text=result.text,
                data=result.data,
                images=[self.writer.images.put(img) for img in result.images],
                error=result.error,
                seconds=round(seconds, 6),
            )
            for call, result, seconds in records
        ]
        self._trace.steps.append(
            TraceStep(index=len(self._trace.steps), model_text=raw, calls=calls, reward=reward, **fields)
        )

    def _close_trace(
        self,
        truncated: bool,
        answer: str | None = None,
        box: list[float] | None = None,
        parts: dict[str, Any] | None = None,
        reward: float = 0.0,
    ) -> None:
        if self._trace is None or self.writer is None:
            return
        episode = self._trace.model_copy(
            update={
                "final_answer": answer,
                "final_box": box,
                "score": parts or {},
                "reward": reward,
                "truncated": truncated,
            }
        )
        self.writer.write(episode)
        self._trace = None
