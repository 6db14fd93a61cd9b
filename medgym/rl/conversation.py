"""The conversation the embedded policy sees, built the same way for SFT, GRPO and evaluation.

One place decides how a case becomes chat messages, so the three paths cannot drift:

- the system message is ``prompts/system.jinja`` without its tool list (the chat template
  renders the tools, from the bridge's methods, in TRL's own format), plus a note on scaling;
- the user turn holds the question image(s) first, then ``environments.env.question_text(case)``;
- a tool turn holds the tool's images, then ``"[name] text"`` -- exactly the env's observation text.

Images are letterboxed into ``POLICY_IMAGE_SIZE`` squares (128 x 128: 16 image tokens with
patch 16 and 2 x 2 merging). Coordinates in every text (question, tool arguments, tool
results, answer boxes) stay in *original* image pixels: the question states the original
size, and the system note tells the model the pictures are shown downscaled.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from medgym import prompts
from medgym.environments.case import Case
from medgym.environments.env import letterbox, question_images, question_text
from medgym.tools import ToolResult

POLICY_IMAGE_SIZE = 128
SCALE_NOTE = (
    "Pictures are shown downscaled to fit {size} x {size} pixels (top-left aligned); "
    "all coordinates stay in original-image pixels."
)


def system_message() -> str:
    """The embedded policy's system text: the project's prompt minus the tool list, plus the scale note."""
    text = prompts.render("system", tools=[]).rstrip()
    if text.endswith("Tools:"):
        text = text[: -len("Tools:")].rstrip()
    return text + "\n" + SCALE_NOTE.format(size=POLICY_IMAGE_SIZE)


def policy_image(img: np.ndarray, size: int = POLICY_IMAGE_SIZE) -> Image.Image:
    """An RGB/grey uint8 picture as the policy sees it: letterboxed into a size x size square."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return Image.fromarray(letterbox(arr.astype(np.uint8), size))


def question(case: Case) -> tuple[str, list[np.ndarray]]:
    """The env's question text and pictures for a case (no tool context is created)."""
    return question_text(case), question_images(case)


def tool_text(name: str, result: ToolResult) -> str:
    """A tool result's text as the env shows it in an observation."""
    return f"[{name}] {result.text}"


def image_parts(images: list[Image.Image]) -> list[dict[str, Any]]:
    return [{"type": "image", "image": img} for img in images]


def prompt_messages(case: Case) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """System and user messages (string contents) and the user's pictures, TRL's dataset layout."""
    text, pictures = question(case)
    return (
        [{"role": "system", "content": system_message()}, {"role": "user", "content": text}],
        [policy_image(p) for p in pictures],
    )


def multimodal_prompt(case: Case) -> list[dict[str, Any]]:
    """The prompt with image blocks in place (the processor's input layout)."""
    messages, images = prompt_messages(case)
    return [
        {"role": "system", "content": [{"type": "text", "text": messages[0]["content"]}]},
        {"role": "user", "content": [*image_parts(images), {"type": "text", "text": messages[1]["content"]}]},
    ]
