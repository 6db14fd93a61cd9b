"""Traces to SFT data: a Hugging Face ``datasets`` Dataset in TRL's conversational VLM format.

One row per kept episode:

- ``messages``: ``[{"role", "content"}]`` with ``content`` a list of parts
  ``{"type": "text", "text": ...}`` or ``{"type": "image", "text": None}``. Roles:
  ``system`` (``medgym.environments.env.system_prompt()``, every tool's schema), ``user``
  (the question image placeholder(s), then the question text), ``assistant`` (the raw
  model text of each turn, ``<tool_call>`` blocks included), ``tool`` (one message per
  call: the tool's text, then one placeholder per returned image). A turn rejected as
  malformed is followed by a ``user`` message holding the env's format-error text,
  which is what the model saw.
- ``images``: PIL images in the order of the image placeholders, across all messages.
- ``stage``, ``template``, ``answer``, ``answer_type``, ``case_id``: for filtering and eval.

This is what ``trl.SFTTrainer`` consumes for vision-language models (``messages`` +
``images``). One caveat, checked in the tests: TRL 1.16's collator
(``trl.data_utils.prepare_multimodal_messages``) only fills image placeholders in
system/user/assistant turns, so a row with images in tool turns makes it fail
("Number of images provided ... does not match"). ``tool_images="user"`` moves the
images of a tool turn into a ``user`` message right after it, which that collator
accepts; the default, ``"tool"``, keeps them where the model saw them (as TRL's GRPO
tool loop does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from medgym.traces.schema import TraceEpisode
from medgym.traces.score import is_correct
from medgym.traces.store import ImageStore, read_traces

log = logging.getLogger(__name__)

ToolImages = Literal["tool", "user"]
TOOL_IMAGES_NOTE = "Images returned by the tool calls above."


@dataclass
class ExportFilter:
    """Which episodes become training rows."""

    correct_only: bool = False
    stages: Sequence[str] = ()
    sources: Sequence[str] = ()

    def keep(self, ep: TraceEpisode) -> bool:
        if self.correct_only and not is_correct(ep):
            return False
        if self.stages and ep.header.stage not in self.stages:
            return False
        return not (self.sources and ep.header.source not in self.sources)


@dataclass
class ExportStats:
    episodes: int = 0
    kept: int = 0
    skipped: list[str] = field(default_factory=list)  # episodes left out for missing images
    problems: list[str] = field(default_factory=list)  # lines of the files that did not load


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


IMAGE_PART: dict[str, Any] = {"type": "image", "text": None}


def episode_row(ep: TraceEpisode, store: ImageStore, system: str, tool_images: ToolImages = "tool") -> dict[str, Any]:
    """One training row; raises FileNotFoundError when a referenced image file is missing."""
    h = ep.header
    digests: list[str] = []

    def images(hashes: Iterable[str | None]) -> list[dict[str, Any]]:
        parts = []
        for d in hashes:
            if d:
                digests.append(d)
                parts.append(dict(IMAGE_PART))
        return parts

    messages: list[dict[str, Any]] = [
        {"role": "system", "content": [_text(system)]},
        {"role": "user", "content": [*images([h.image, h.prior_image]), _text(h.question)]},
    ]
    for step in ep.steps:
        messages.append({"role": "assistant", "content": [_text(step.model_text)]})
        if step.format_error is not None:
            messages.append({"role": "user", "content": [_text(step.format_error)]})
        moved: list[dict[str, Any]] = []
        for call in step.calls:
            placeholders = images(call.images)
            if tool_images == "user":
                moved += placeholders
                placeholders = []
            messages.append({"role": "tool", "content": [_text(call.text), *placeholders]})
        if moved:
            messages.append({"role": "user", "content": [*moved, _text(TOOL_IMAGES_NOTE)]})
    pics = []
    for d in digests:
        path = store.path(d)
        if not path.exists():
            raise FileNotFoundError(f"image {d[:12]} is missing from {store.root}")
        with Image.open(path) as im:
            pics.append(im.convert("RGB"))
    return {
        "messages": messages,
        "images": pics,
        "stage": h.stage,
        "template": h.template,
        "answer": h.answer,
        "answer_type": h.answer_type,
        "case_id": h.case_id,
    }


def features() -> Any:
    """The dataset's schema (explicit, so an export with no image parts still types ``text`` as string)."""
    from datasets import Features, List, Value
    from datasets import Image as HFImage

    part = {"type": Value("string"), "text": Value("string")}
    return Features(
        {
            "messages": List({"role": Value("string"), "content": List(part)}),
            "images": List(HFImage()),
            "stage": Value("string"),
            "template": Value("string"),
            "answer": Value("string"),
            "answer_type": Value("string"),
            "case_id": Value("string"),
        }
    )


def export_sft(
    paths: Sequence[Path | str],
    out: Path | str,
    keep: ExportFilter | None = None,
    tool_images: ToolImages = "tool",
    *,
    system_prompt: Callable[[str], str],
) -> ExportStats:
    """Write the kept episodes of trace files as a ``datasets`` Dataset (``save_to_disk``) in ``out``.

    ``system_prompt(tool_mode)`` gives each episode's system text (the caller passes the contract's:
    ``traces`` imports nothing above it). Episodes recorded before tool modes count as ``oracle``.
    """
    from datasets import Dataset

    if tool_images not in ("tool", "user"):
        raise ValueError(f"tool_images must be 'tool' or 'user', got {tool_images!r}")
    keep = keep or ExportFilter()
    stats = ExportStats()
    rows: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        traces = read_traces(path)
        stats.problems += [f"{path}: {p}" for p in traces.problems]
        store = ImageStore(path.parent / "images", create=False)
        for ep in traces.episodes:
            stats.episodes += 1
            if not keep.keep(ep):
                continue
            try:
                system = system_prompt(ep.header.tool_mode or "oracle")
                rows.append(episode_row(ep, store, system, tool_images))
            except (FileNotFoundError, OSError) as exc:
                msg = f"{path}: episode {ep.header.episode_id} ({ep.header.case_id}) left out: {exc}"
                log.warning(msg)
                stats.skipped.append(msg)
    stats.kept = len(rows)
    if not rows:
        raise ValueError(
            f"no episode left to export ({stats.episodes} read); loosen the filters (--correct-only, --stage, --source)"
        )
    columns = {name: [r[name] for r in rows] for name in rows[0]}
    Dataset.from_dict(columns, features=features()).save_to_disk(str(out))
    return stats
