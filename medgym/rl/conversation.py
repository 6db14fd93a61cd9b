"""The conversations the embedded policy trains on, built from the one model-facing contract.

Training must show the policy exactly what evaluation and chat show it, so this module builds
nothing of its own: the question is the contract's (:func:`medgym.environments.contract.question_text`
and ``question_images``), tool turns are the bridge's results (the one call runner, ``"[name] text"``
after the pictures), pictures are letterboxed by the embedded backend's own converter
(:func:`medgym.agents.backends.letterboxed`), and tools reach the chat template only through
``tools=`` (:func:`medgym.environments.contract.tool_schemas`).

The system text is the embedded recipe's: the contract's system prompt for the tool mode plus a
note on scaling. A checkpoint records the text it was trained with in its ``medgym.json``, and
its backend prompts it with that text (:class:`medgym.agents.backends.EmbeddedBackend`).

Images are letterboxed into ``POLICY_IMAGE_SIZE`` squares (128 x 128: 16 image tokens with patch
16 and 2 x 2 merging). Coordinates in every text stay in *original* image pixels.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from medgym.agents.backends import EMBEDDED_IMAGE_SIZE, letterboxed
from medgym.environments.case import Case
from medgym.environments.contract import DEFAULT_TOOL_MODE, question_images, question_text, system_prompt

if TYPE_CHECKING:
    from medgym.rl.bridge import MedGymToolEnv

POLICY_IMAGE_SIZE = EMBEDDED_IMAGE_SIZE
SCALE_NOTE = (
    "Pictures are shown downscaled to fit {size} x {size} pixels (top-left aligned); "
    "all coordinates stay in original-image pixels."
)


def system_message(tool_mode: str = DEFAULT_TOOL_MODE) -> str:
    """The embedded recipe's system text: the contract's system prompt plus the scale note."""
    return system_prompt(tool_mode) + "\n" + SCALE_NOTE.format(size=POLICY_IMAGE_SIZE)


def policy_image(img: np.ndarray, size: int = POLICY_IMAGE_SIZE) -> Image.Image:
    """An RGB/grey uint8 picture as the policy sees it: letterboxed into a size x size square."""
    return letterboxed(size)(img)


def image_parts(images: list[Image.Image]) -> list[dict[str, Any]]:
    return [{"type": "image", "image": img} for img in images]


def prompt_messages(
    case: Case, tool_mode: str = DEFAULT_TOOL_MODE, system: str | None = None
) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """System and user messages (string contents) and the user's pictures, TRL's dataset layout."""
    return (
        [
            {"role": "system", "content": system if system is not None else system_message(tool_mode)},
            {"role": "user", "content": question_text(case, tool_mode)},
        ],
        [policy_image(p) for p in question_images(case)],
    )


def multimodal_prompt(
    case: Case, tool_mode: str = DEFAULT_TOOL_MODE, system: str | None = None
) -> list[dict[str, Any]]:
    """The prompt with image blocks in place (the processor's input layout)."""
    messages, images = prompt_messages(case, tool_mode, system)
    return [
        {"role": "system", "content": [{"type": "text", "text": messages[0]["content"]}]},
        {"role": "user", "content": [*image_parts(images), {"type": "text", "text": messages[1]["content"]}]},
    ]


def expert_conversation(
    case: Case,
    env: MedGymToolEnv | None = None,
    tool_mode: str | None = None,
    system: str | None = None,
    turns: int = 0,
    candidate_iou: float | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """The expert episode of a case as chat messages (multimodal content blocks); also the number of pictures.

    The calls run through the bridge (the one call runner); in predicted mode the expert's answer is
    computed from the results it read (:func:`medgym.environments.templates.expert_answer`).
    ``turns`` > 0 ends the episode at its ``turns``-th assistant message (no tool runs after it).
    ``candidate_iou`` overrides the expert's rule for segmenting a detect candidate by number
    (:func:`medgym.environments.expert.expert_calls`).
    """
    from medgym.environments.expert import expert_answer, expert_calls
    from medgym.rl.bridge import MedGymToolEnv, start_case

    env = env or MedGymToolEnv(tool_mode=tool_mode or DEFAULT_TOOL_MODE)
    mode = tool_mode or env.tool_mode
    start_case(env, case)  # the very case given (it may not come from a seed), not rebuilt
    messages = multimodal_prompt(case, mode, system)
    for made, call in enumerate(expert_calls(case, mode, candidate_iou), start=1):
        messages.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}],
            }
        )
        if made == turns:
            return messages, count_images(messages)
        result = env._call_tool(call.name, dict(call.arguments))
        if isinstance(result, str):
            result = [{"type": "text", "text": result}]
        messages.append({"role": "tool", "name": call.name, "content": result})
    records = [
        {"name": c.name, "arguments": c.arguments, "text": c.text, "data": c.data, "error": c.error} for c in env.calls
    ]
    answer = expert_answer(case, mode, records)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages, count_images(messages)


def evidence_prompt(case: Case, env: MedGymToolEnv | None = None, tool_mode: str | None = None) -> list[dict[str, Any]]:
    """The expert's episode of a case up to, not including, its answer: system, question, calls and real results.

    The prompt of an answer turn written from the annotator's evidence (GRPO's ``answer_evidence: expert``);
    the answer itself is left to the policy.
    """
    messages, _ = expert_conversation(case, env, tool_mode)
    return messages[:-1]


def count_images(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p.get("type") == "image")


def counterfactual_answer(messages: list[dict[str, Any]], rng: np.random.Generator) -> list[dict[str, Any]] | None:
    """The conversation with its answer's number swapped for a random one, in the answer and in the tool results that printed it.

    The answer of a measurement question is a number a tool printed (``measure``'s area, diameter,
    mean); a policy trained on real conversations alone can score well on the loss by answering
    typical values. With the number replaced in both places (same sign, same decimals, a value a
    tool could print), only copying it from the tool result gives the answer (``segment`` and
    ``measure`` both print a mask's area: every printing changes). None when the answer is not a
    number the tools printed (classes, counts, percent changes computed from two results) -- those
    conversations stay as they are.

    >>> msgs = [{"role": "tool", "content": [{"type": "text", "text": "[measure] area 12.5 mm2, mean 40.1 HU"}]},
    ...         {"role": "assistant", "content": [{"type": "text", "text": "<answer>12.5</answer>"}]}]
    >>> out = counterfactual_answer(msgs, np.random.default_rng(0))
    >>> new = re.search(r"<answer>(.*)</answer>", out[-1]["content"][0]["text"]).group(1)
    >>> new != "12.5" and f"area {new} mm2, mean 40.1 HU" in out[0]["content"][0]["text"]
    True
    >>> counterfactual_answer(msgs[:1] + [{"role": "assistant", "content": [{"type": "text", "text": "<answer>B</answer>"}]}],
    ...                       np.random.default_rng(0)) is None
    True
    """
    final = messages[-1]["content"][0]["text"] if messages and messages[-1]["role"] == "assistant" else ""
    found = re.search(r"<answer>\s*(-?\d+(?:\.\d+)?)\s*</answer>", final)
    if not found:
        return None
    value = found.group(1)
    decimals = len(value.split(".")[1]) if "." in value else 0
    magnitude = max(abs(float(value)), 1.0)
    for _ in range(10):
        drawn = float(rng.uniform(0.2, 3.0)) * magnitude * (-1 if value.startswith("-") else 1)
        new = f"{drawn:.{decimals}f}"
        if new != value:
            break
    else:
        return None
    pattern = rf"(?<![\d.]){re.escape(value)}(?![\d]|\.\d)"  # the number whole, not inside a longer one
    out, swapped = [], 0
    for m in messages:
        if m["role"] == "tool" and isinstance(m["content"], list):
            parts = []
            for part in m["content"]:
                if part.get("type") == "text":
                    text, n = re.subn(pattern, new, part["text"])
                    part, swapped = {**part, "text": text}, swapped + n
                parts.append(part)
            m = {**m, "content": parts}
        out.append(m)
    if not swapped:
        return None
    out[-1] = {
        **out[-1],
        "content": [{"type": "text", "text": final.replace(found.group(0), f"<answer>{new}</answer>", 1)}],
    }
    return out
