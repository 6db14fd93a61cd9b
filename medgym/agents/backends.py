"""Planner backends: what writes the agent's next turn.

Every backend has one method::

    next_turn(messages, *, temperature) -> str

``messages`` is the conversation so far as plain dicts ``{"role", "content", "images", "name"}``:
``role`` is ``system``, ``user``, ``assistant`` or ``tool``; ``images`` are RGB uint8 arrays
(the question's pictures on the first user message, crops and overlays on tool messages).
The returned text is a model turn in medgym's format — thoughts, then ``<tool_call>{...}</tool_call>``
blocks or an ``<answer>`` — and is parsed by :func:`medgym.environments.parsing.parse_action`,
exactly as the env parses it. Backends whose API returns structured tool calls (OpenAI) write
them back in that format, so the loop has one parser.

- ``expert``: replays a case's expert trace (the env's ``ExpertPolicy`` turns);
- ``demo``: a *scripted demo*, not a model — zoom the centre, window, segment a centre box,
  measure, answer with the measurement; for trying the chat on any image;
- ``openai``: any OpenAI-compatible chat-completions endpoint (vLLM, TGI, ...);
- ``transformers``: any local image-text-to-text model by path (Qwen2.5-VL and the like);
- ``embedded``: the project's own small policy, loaded from a checkpoint shipped at a path.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from medgym import EMBEDDED_POLICY_DIR
from medgym.environments.case import Case, ToolCall
from medgym.environments.env import tool_schemas
from medgym.environments.parsing import parse_action

log = logging.getLogger(__name__)

Message = dict[str, Any]

DEMO_LABEL = "Scripted demo (not a model)"
ERR_NO_EMBEDDED = (
    "The embedded policy is not available: no checkpoint at {path}. Train it with `medgym train` "
    "(it writes the checkpoint there), or pass the path of a trained checkpoint with --checkpoint, "
    "or choose another backend (--backend demo|expert|openai|transformers)."
)
ERR_EXPERT_NO_CASE = (
    "The expert backend follows a case's expert trace, and uploaded images have none. "
    "Chat over a phantom case (--case-seed N), or use --backend demo for a scripted demo on any image."
)
ERR_UNKNOWN_BACKEND = "Unknown backend {name!r}; choose one of: {names}."


class BackendUnavailable(RuntimeError):
    """A backend that cannot run here (missing checkpoint, no case for the expert); the message says why."""


class PlannerBackend(Protocol):
    """What the planner node calls for the next model turn."""

    model_id: str

    def next_turn(self, messages: list[Message], *, temperature: float = 0.0) -> str: ...


def turn_index(messages: list[Message]) -> int:
    """How many assistant turns the current question has had (messages after the last user question)."""
    k = 0
    for m in reversed(messages):
        if m["role"] == "assistant":
            k += 1
        elif m["role"] == "user" and m.get("kind") == "question":
            break
    return k


def png_data_url(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def calls_text(calls: list[dict[str, Any]]) -> str:
    return "".join(ToolCall(c["name"], c["arguments"]).as_text() for c in calls)


# ----------------------------------------------------------------------------- scripted


class ExpertBackend:
    """Follows a case's expert trace: its calls one per turn, then its answer (the env's ExpertPolicy turns).

    Stateless: the turn to give is read from the conversation, so a resumed session goes on where it was.
    A follow-up question on the same case replays the trace from its start.
    """

    model_id = "expert"

    def __init__(self, case: Case | None):
        if case is None:
            raise BackendUnavailable(ERR_EXPERT_NO_CASE)
        from medgym.environments.policies import ExpertPolicy

        policy = ExpertPolicy()
        policy.reset(case)
        self.turns = [policy.act() for _ in range(len(case.expert_calls) + 1)]

    def next_turn(self, messages: list[Message], *, temperature: float = 0.0) -> str:
        return self.turns[min(turn_index(messages), len(self.turns) - 1)]


_MASK_ID = re.compile(r"\b(mask_\d+):")
_BOX = re.compile(r"component 1 box \[(\d+), (\d+), (\d+), (\d+)\]")
_DIAMETER = re.compile(r"longest diameter ([\d.]+) mm")


class DemoBackend:
    """A scripted demo for any image — NOT a model: zoom the centre, window, segment a centre box, measure, answer.

    It reads what it needs (image size, modality, mask id, box, diameter) from the conversation,
    so it is stateless like the expert.
    """

    model_id = "scripted-demo"

    def next_turn(self, messages: list[Message], *, temperature: float = 0.0) -> str:
        first = next(m for m in messages if m["role"] == "user" and m.get("images"))
        h, w = first["images"][0].shape[:2]
        modality = first["content"].split(" ", 1)[0]
        k = turn_index(messages)
        centre = [round(w * 0.25), round(h * 0.25), round(w * 0.75), round(h * 0.75)]
        inner = [round(w * 0.35), round(h * 0.35), round(w * 0.65), round(h * 0.65)]
        last_tool = next((m["content"] for m in reversed(messages) if m["role"] == "tool"), "")
        label = f"[{DEMO_LABEL}] "
        if k == 0:
            return (
                label
                + "Step 1: zoom on the centre of the image."
                + calls_text([{"name": "zoom", "arguments": {"boxes": [centre]}}])
            )
        if k == 1:
            args = {"preset": "soft_tissue"} if modality == "CT" else {"center": 128, "width": 256}
            return (
                label + "Step 2: window the image for contrast." + calls_text([{"name": "window", "arguments": args}])
            )
        if k == 2:
            return (
                label
                + "Step 3: segment the object in a centre box."
                + calls_text([{"name": "segment", "arguments": {"box": inner}}])
            )
        mask = _MASK_ID.search(last_tool) if k == 3 else None
        if k == 3 and mask:
            return (
                label
                + "Step 4: measure the mask."
                + calls_text([{"name": "measure", "arguments": {"target": mask.group(1)}}])
            )
        seg = next((m["content"] for m in reversed(messages) if m["role"] == "tool" and m.get("name") == "segment"), "")
        diameter = _DIAMETER.search(last_tool)
        box = _BOX.search(seg)
        if diameter is None:
            return label + "<answer>The scripted demo could not segment an object at the image centre.</answer>"
        box_text = f"<box>[{', '.join(box.groups())}]</box>" if box else ""
        return (
            label
            + f"<answer>{diameter.group(1)} mm: longest diameter of the object at the image centre "
            + f"(scripted demo, not a diagnosis).</answer>{box_text}"
        )


class ScriptedBackend:
    """Replays given turns in order and records what it was shown (for tests and demos)."""

    model_id = "scripted"

    def __init__(self, turns: list[str]):
        self.turns = list(turns)
        self.calls: list[list[Message]] = []

    def next_turn(self, messages: list[Message], *, temperature: float = 0.0) -> str:
        self.calls.append(messages)
        return self.turns[min(len(self.calls) - 1, len(self.turns) - 1)]


# ----------------------------------------------------------------------------- OpenAI-compatible


def openai_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """medgym messages -> chat-completions messages.

    Assistant turns with ``<tool_call>`` blocks become ``tool_calls`` (ids by position), the tool
    results ``role: tool`` messages answering them, and the images tools returned follow in a user
    message as PNG data URLs (the ``tool`` role carries text only in the OpenAI API).
    """
    out: list[dict[str, Any]] = []
    pending_ids: list[str] = []
    pending_images: list[np.ndarray] = []

    def flush_images() -> None:
        if pending_images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": "Images returned by the tools:"}]
            parts += [{"type": "image_url", "image_url": {"url": png_data_url(img)}} for img in pending_images]
            out.append({"role": "user", "content": parts})
            pending_images.clear()

    for i, m in enumerate(messages):
        role = m["role"]
        if role != "tool":
            flush_images()
        if role == "assistant":
            action = parse_action(m["content"])
            if action.calls:
                pending_ids = [f"call_{i}_{j}" for j in range(len(action.calls))]
                thought = re.sub(r"<tool_call>.*?</tool_call>", "", m["content"], flags=re.S).strip()
                out.append(
                    {
                        "role": "assistant",
                        "content": thought or None,
                        "tool_calls": [
                            {
                                "id": cid,
                                "type": "function",
                                "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
                            }
                            for cid, c in zip(pending_ids, action.calls, strict=True)
                        ],
                    }
                )
            else:
                out.append({"role": "assistant", "content": m["content"]})
        elif role == "tool" and pending_ids:
            out.append({"role": "tool", "tool_call_id": pending_ids.pop(0), "content": m["content"]})
            pending_images.extend(m.get("images", []))
        elif m.get("images"):
            parts = [{"type": "image_url", "image_url": {"url": png_data_url(img)}} for img in m["images"]]
            out.append({"role": "user", "content": [*parts, {"type": "text", "text": m["content"]}]})
        else:
            out.append({"role": "user" if role == "tool" else role, "content": m["content"]})
    flush_images()
    return out


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint; native tool calls come back as ``<tool_call>`` text."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        max_tokens: int = 1024,
        timeout: float = 120.0,
        client: Any = None,
    ):
        if client is None:
            from openai import OpenAI

            client = OpenAI(
                base_url=base_url or os.environ.get("OPENAI_BASE_URL"),
                api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                timeout=timeout,
                max_retries=1,
            )
        self.client = client
        self.model = model
        self.model_id = f"openai:{model}"
        self.max_tokens = max_tokens

    def next_turn(self, messages: list[Message], *, temperature: float = 0.0) -> str:
        response = self.client.chat.completions.create(
            model=self.model,
            messages=openai_messages(messages),
            tools=tool_schemas(),
            temperature=temperature,
            max_tokens=self.max_tokens,
        )
        message = response.choices[0].message
        text = message.content or ""
        calls = []
        for call in message.tool_calls or []:
            arguments: Any = call.function.arguments
            try:
                arguments = json.loads(arguments) if arguments else {}
            except json.JSONDecodeError:
                pass  # left as a string: parse_action reports it as a format error the model can fix
            calls.append({"name": call.function.name, "arguments": arguments})
        if calls:
            # A turn holds calls or an answer, not both: structured calls win over stray text tags.
            text = re.sub(r"<(tool_call|answer|box)>.*?</\1>", "", text, flags=re.S).strip()
            text += "".join(
                "<tool_call>" + json.dumps({"name": c["name"], "arguments": c["arguments"]}) + "</tool_call>"
                for c in calls
            )
        return text


# ----------------------------------------------------------------------------- transformers

# A Qwen2.5-VL-style chat template with Hermes tool calling, used when a processor has none.
QWEN_VL_TOOL_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content if messages[0].content is string else messages[0].content[0].text }}\n\n{% endif -%}"
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message.role == 'system') %}"
    "<|im_start|>{{ message.role }}\n"
    "{%- if message.content is string %}{{ message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'image' %}{%- set image_count.value = image_count.value + 1 -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part.type == 'text' %}{{ part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def transformers_conversation(messages: list[Message]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """medgym messages -> (chat-template conversation with image placeholders, the images in order).

    Tool results become user turns wrapped in ``<tool_response>`` (what Qwen's Hermes templates render
    for the ``tool`` role), so templates without a tool role work too.
    """
    conversation, images = [], []
    for m in messages:
        text = m["content"]
        role = m["role"]
        if role == "tool":
            role, text = "user", f"<tool_response>\n{text}\n</tool_response>"
        pics = m.get("images") or []
        if pics:
            parts: list[dict[str, Any]] = [{"type": "image"} for _ in pics]
            parts.append({"type": "text", "text": text})
            conversation.append({"role": role, "content": parts})
            images += [Image.fromarray(p) for p in pics]
        else:
            conversation.append({"role": role, "content": text})
    return conversation, images


class TransformersBackend:
    """Any local image-text-to-text model by path, through its processor's chat template (tools included)."""

    def __init__(
        self,
        path: str | Path,
        device: str | None = None,
        max_new_tokens: int = 512,
        dtype: str = "auto",
        model_id: str | None = None,
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.path = str(path)
        self.processor = AutoProcessor.from_pretrained(self.path)
        if not getattr(self.processor, "chat_template", None):
            self.processor.chat_template = QWEN_VL_TOOL_TEMPLATE
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.model_id = model_id or f"transformers:{Path(self.path).name}"

    def next_turn(self, messages: list[Message], *, temperature: float = 0.0) -> str:
        import torch

        conversation, images = transformers_conversation(messages)
        prompt = self.processor.apply_chat_template(
            conversation, tools=tool_schemas(), add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt").to(self.device)
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sampling)
        new = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.decode(new, skip_special_tokens=True).strip()


def default_embedded_path() -> Path:
    """Where the embedded policy's checkpoint is looked for: $MEDGYM_EMBEDDED_POLICY, else package data."""
    env = os.environ.get("MEDGYM_EMBEDDED_POLICY")
    return Path(env) if env else EMBEDDED_POLICY_DIR


class EmbeddedBackend:
    """The project's own small policy: a transformers checkpoint at a path (written by ``medgym train``).

    Training lives in ``medgym.rl`` (never imported here); this backend only loads what training
    saved (the shipped checkpoint by default), and says so clearly when there is nothing to load.
    """

    def __init__(self, checkpoint: str | Path | None = None, device: str | None = None, max_new_tokens: int = 256):
        path = Path(checkpoint) if checkpoint else default_embedded_path()
        if not (path / "config.json").is_file():
            raise BackendUnavailable(ERR_NO_EMBEDDED.format(path=path))
        self.inner = TransformersBackend(path, device=device, max_new_tokens=max_new_tokens, model_id="embedded")
        self.model_id = "embedded"
        meta_file = path / "medgym.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self.system_prompt: str | None = meta.get("system_prompt")  # the text it was trained with

    def next_turn(self, messages: list[Message], *, temperature: float = 0.0) -> str:
        if self.system_prompt is not None:  # prompt it as it was trained, not with the env's generic text
            messages = [{**m, "content": self.system_prompt} if m["role"] == "system" else m for m in messages]
        return self.inner.next_turn(messages, temperature=temperature)


BackendFactory = Callable[..., PlannerBackend]
BACKENDS: dict[str, BackendFactory] = {
    "expert": lambda case=None, **_: ExpertBackend(case),
    "demo": lambda **_: DemoBackend(),
    "openai": lambda model="default", base_url=None, api_key=None, **_: OpenAIBackend(model, base_url, api_key),
    "transformers": lambda model_path=None, device=None, **_: TransformersBackend(model_path, device=device),
    "embedded": lambda checkpoint=None, device=None, **_: EmbeddedBackend(checkpoint, device=device),
}


def make_backend(name: str, **options: Any) -> PlannerBackend:
    """A backend by name; options a backend does not use are ignored (``case`` for expert, ``model`` for openai ...)."""
    if name not in BACKENDS:
        raise BackendUnavailable(ERR_UNKNOWN_BACKEND.format(name=name, names=", ".join(BACKENDS)))
    if name == "transformers" and not options.get("model_path"):
        raise BackendUnavailable("The transformers backend needs a model folder: pass --model PATH.")
    return BACKENDS[name](**options)
