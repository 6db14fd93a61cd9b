"""Policies behind one protocol, and the specs that name them.

Every policy has ``model_id`` and one method (:class:`medgym.environments.policies.Policy`)::

    next_turn(messages, *, temperature) -> str

``messages`` are the contract's dicts (:mod:`medgym.environments.contract`): ``{"role", "content",
"images", "name"}``, ``role`` one of ``system``, ``user``, ``assistant``, ``tool``; ``images`` RGB
uint8 arrays (the question's pictures on the first user message, crops and overlays on tool
messages). The returned text is a model turn in medgym's format — thoughts, then
``<tool_call>{...}</tool_call>`` blocks or an ``<answer>`` — parsed by
:func:`medgym.environments.parsing.parse_action`, as the env parses it. Backends whose API
returns structured tool calls (OpenAI) write them back in that format, so there is one parser.

:func:`make_policy` reads the specs ``medgym eval --policy``, ``medgym chat/web --backend``,
``medgym serve --policy`` and training all accept:

- ``expert``: follows a case's expert trace (:class:`~medgym.environments.policies.ExpertPolicy`);
- ``embedded`` / ``embedded-sft`` / ``embedded:PATH``: the project's own small policy, a checkpoint
  shipped in the package (or at a path);
- ``transformers:PATH``: any local image-text-to-text model folder (Qwen2.5-VL and the like);
- ``openai:MODEL@URL`` (or ``openai:MODEL`` with ``$OPENAI_BASE_URL``): any OpenAI-compatible
  chat-completions endpoint (vLLM, TGI, ``medgym serve``);
- ``demo``: a *scripted demo*, not a model — zoom the centre, window, segment a centre box,
  measure, answer with the measurement; for trying the chat on any image;
- ``prior`` / ``prior:N``: a *baseline*, not a model — per question template the answer most common
  among N (1000) training cases, no tool, no look at the picture
  (:class:`~medgym.environments.policies.AnswerPriorPolicy`); benchmark cases only.

Tools reach a model only through ``tools=`` (chat template or OpenAI request), never pasted into
the system text.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medgym import CHECKPOINTS_DIR, EMBEDDED_POLICY_DIR
from medgym.environments.case import Case, ToolCall
from medgym.environments.contract import DEFAULT_TOOL_MODE, LAST_TURN_KIND, Message, tool_schemas
from medgym.environments.parsing import parse_action
from medgym.environments.policies import ExpertPolicy, Policy, turn_index

log = logging.getLogger(__name__)

PlannerBackend = Policy  # the agent graph's name for a policy

DEMO_LABEL = "Scripted demo (not a model)"
ERR_NO_EMBEDDED = (
    "The embedded policy is not available: no checkpoint at {path}. Train it with `medgym train` "
    "(it writes the checkpoint there), or pass the path of a trained checkpoint (embedded:PATH), "
    "or choose another policy (expert, demo, transformers:PATH, openai:MODEL@URL)."
)
ERR_UNKNOWN_POLICY = (
    "Unknown policy {spec!r}; write one of: expert, demo, prior, prior:N, embedded, embedded-sft, embedded:PATH, "
    "transformers:PATH, openai:MODEL@URL."
)
ERR_NEEDS_PATH = "The {name} policy needs a model folder: write {name}:PATH."
ERR_UNKNOWN_BACKEND = ERR_UNKNOWN_POLICY  # the chat's --backend takes the same specs


class BackendUnavailable(RuntimeError):
    """A policy that cannot run here (missing checkpoint, no case for the expert); the message says why."""


def png_data_url(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def calls_text(calls: list[dict[str, Any]]) -> str:
    return "".join(ToolCall(c["name"], c["arguments"]).as_text() for c in calls)


# ----------------------------------------------------------------------------- scripted


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
    """Any OpenAI-compatible chat-completions endpoint; native tool calls come back as ``<tool_call>`` text.

    Requests carry the tools (``tools=``, ``tool_choice: "auto"``). ``constrained=True`` also asks the
    endpoint to decode under the turn grammar: ``extra_body={"structured_outputs": {"grammar": EBNF}}``
    (:func:`medgym.agents.constrained.turn_grammar`), vLLM's structured outputs (v0.12 and later; its
    xgrammar backend reads this EBNF). It is not part of the OpenAI API: other servers ignore it or
    refuse the request, so it is opt-in.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        max_tokens: int = 1024,
        timeout: float = 120.0,
        client: Any = None,
        constrained: bool = False,
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
        self.constrained = constrained

    def request_options(self) -> dict[str, Any]:
        """What every request carries besides the messages: tools, sampling budget, the grammar when constrained."""
        tools = tool_schemas()
        options: dict[str, Any] = {"tools": tools, "tool_choice": "auto", "max_tokens": self.max_tokens}
        if self.constrained:
            from medgym.agents.constrained import TurnLimits, turn_grammar

            grammar = turn_grammar(tools, TurnLimits.for_budget(self.max_tokens))
            options["extra_body"] = {"structured_outputs": {"grammar": grammar}}
        return options

    def next_turn(self, messages: list[Message], *, temperature: float = 0.0) -> str:
        response = self.client.chat.completions.create(
            model=self.model,
            messages=openai_messages(messages),
            temperature=temperature,
            **self.request_options(),
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

# A Qwen2.5-VL-style chat template with Hermes tool calling, used when a processor has none. Tool turns
# render as Qwen's do (a user turn in <tool_response>), their images kept in place.
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
    "{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{%- endif %}"
    "{%- if message.content is string %}{{ message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'image' %}{%- set image_count.value = image_count.value + 1 -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part.type == 'text' %}{{ part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- if message.role == 'tool' %}\n</tool_response>{%- endif %}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def letterboxed(size: int) -> Callable[[np.ndarray], Image.Image]:
    """A picture converter that letterboxes into ``size`` squares (how the embedded policy sees images)."""
    from medgym.environments.env import letterbox

    def convert(img: np.ndarray) -> Image.Image:
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        return Image.fromarray(letterbox(arr.astype(np.uint8), size))

    return convert


def chat_conversation(
    messages: list[Message], picture: Callable[[np.ndarray], Image.Image] | None = None
) -> list[dict[str, Any]]:
    """Contract messages -> a chat-template conversation: content parts, images in place (PIL).

    ``tool`` messages stay ``tool`` turns with their images before the text (templates that drop
    such images are what ``medgym check --model`` finds and repairs). Events the UI shows are left out.
    """
    picture = picture or (lambda a: Image.fromarray(np.asarray(a, dtype=np.uint8)))
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] not in ("system", "user", "assistant", "tool"):
            continue
        parts: list[dict[str, Any]] = [{"type": "image", "image": picture(p)} for p in m.get("images") or []]
        parts.append({"type": "text", "text": m["content"]})
        turn: dict[str, Any] = {"role": m["role"], "content": parts}
        if m["role"] == "tool" and m.get("name"):
            turn["name"] = m["name"]
        out.append(turn)
    return out


def conversation_images(conversation: list[dict[str, Any]]) -> list[Image.Image]:
    return [p["image"] for m in conversation for p in m["content"] if isinstance(p, dict) and p.get("type") == "image"]


class TransformersBackend:
    """Any local image-text-to-text model by path, through its processor's chat template and ``tools=``.

    ``system_prompt`` replaces the system text (a checkpoint prompted as it was trained);
    ``image_size`` letterboxes pictures into squares first (None: the processor resizes);
    ``tools=False`` prompts without the tool list (a no-tools baseline); ``constrained=True`` decodes
    under the turn grammar (:mod:`medgym.agents.constrained`), so every turn parses.
    """

    def __init__(
        self,
        path: str | Path,
        device: str | None = None,
        max_new_tokens: int | None = None,
        dtype: str = "auto",
        model_id: str | None = None,
        system_prompt: str | None = None,
        image_size: int | None = None,
        tools: bool = True,
        attn_implementation: str | None = None,
        tool_schemas: list[dict[str, Any]] | None = None,
        constrained: bool = False,
        turn_limits: Any = None,
        prefix_cache: bool = True,
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.path = str(path)
        self.processor = AutoProcessor.from_pretrained(self.path)
        if not getattr(self.processor, "chat_template", None):
            self.processor.chat_template = QWEN_VL_TOOL_TEMPLATE
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype: Any = torch.float32 if dtype == "auto" and self.device == "cpu" else dtype
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model = (
            AutoModelForImageTextToText.from_pretrained(self.path, dtype=torch_dtype, **kwargs).to(self.device).eval()
        )
        # None: the folder's own turn length (generation_config.max_new_tokens, e.g. a zoo model's), else 512
        self.max_new_tokens = max_new_tokens or self.model.generation_config.max_new_tokens or 512
        self.model_id = model_id or f"transformers:{Path(self.path).name}"
        self.system_prompt = system_prompt
        self.picture = letterboxed(image_size) if image_size else None
        self.tools = tools
        self.schemas = tool_schemas  # None: the contract's current tools
        self.constrained = constrained
        self.turn_limits = turn_limits  # constrained.TurnLimits; None: sized from max_new_tokens
        self.prefix_cache = prefix_cache
        self._prefix: tuple[tuple[int, ...], list[Any]] | None = None  # (system-turn token ids, their keys and values)

    def conversation(self, messages: list[Message]) -> list[dict[str, Any]]:
        """The chat-template conversation this model is prompted with."""
        if self.system_prompt is not None:  # prompt it as it was trained
            messages = [{**m, "content": self.system_prompt} if m["role"] == "system" else m for m in messages]
        return chat_conversation(messages, self.picture)

    def tool_list(self) -> list[dict[str, Any]] | None:
        """The tools in the prompt: the contract's, or the ones a checkpoint was trained with (recorded in it)."""
        if not self.tools:
            return None
        return self.schemas if self.schemas is not None else tool_schemas()

    def render(self, messages: list[Message]) -> str:
        """The prompt text (what the model reads before generating), for parity checks and debugging."""
        return self.processor.apply_chat_template(
            self.conversation(messages),
            tools=self.tool_list(),
            add_generation_prompt=True,
            tokenize=False,
        )

    def grammar_options(self, answer_only: bool = False) -> dict[str, Any]:
        """``generate`` options that decode one turn under the turn grammar (a fresh processor each call).

        ``answer_only``: the loop's last turn (:data:`~medgym.environments.contract.LAST_TURN_KIND`): no tool call is admitted.
        """
        from transformers import LogitsProcessorList

        from medgym.agents.constrained import constrained_logits_processor, stop_ids

        stops = stop_ids(self.processor.tokenizer, self.model.generation_config)
        grammar = constrained_logits_processor(
            self.processor.tokenizer,
            None if answer_only else self.tool_list(),
            limits=self.turn_limits,
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=stops,
        )
        # generate must stop on every token the grammar ends a turn with
        return {"logits_processor": LogitsProcessorList([grammar]), "eos_token_id": list(stops)}

    def cached_system_turn(self, ids: Any) -> dict[str, Any]:
        """``generate``'s cache argument holding the system turn's keys and values (system text and tool list).

        The system turn is the same in every turn of every episode, so it runs once per backend (the
        weights of a backend's model do not change) and each turn starts decoding after it; greedy turns
        are the same as without (``tests/agents/test_prefix_cache.py``). Empty (no cache) with
        ``prefix_cache=False``, for models without multimodal RoPE, or a prompt without a system turn.
        """
        from medgym.agents.prefix_cache import cache_keyword, has_multimodal_rope, kv_cache, prefix_kv

        if not self.prefix_cache or not has_multimodal_rope(self.model):
            return {}
        tokenizer = self.processor.tokenizer
        turn_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        if turn_start is None or turn_start == tokenizer.unk_token_id:
            return {}
        starts = (ids == turn_start).nonzero()
        if len(starts) < 2 or int(starts[0]) != 0:
            return {}
        key = tuple(ids[: int(starts[1])].tolist())
        if self._prefix is None or self._prefix[0] != key:
            self._prefix = (key, prefix_kv(self.model, ids[: len(key)]))
        self.model.model.rope_deltas = None  # positions of this prompt, not of the last turn's decoding
        return {cache_keyword(self.model): kv_cache(self.model, self._prefix[1])}

    def next_turn(self, messages: list[Message], *, temperature: float = 0.0) -> str:
        import torch

        inputs = self.processor.apply_chat_template(
            self.conversation(messages),
            tools=self.tool_list(),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        ).to(self.device)
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature}
        if self.constrained:
            last = bool(messages) and messages[-1].get("kind") == LAST_TURN_KIND
            sampling.update(self.grammar_options(answer_only=last))
        with torch.inference_mode():
            cache = self.cached_system_turn(inputs["input_ids"][0])
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sampling, **cache)
        new = out[0, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def default_embedded_path() -> Path:
    """Where the embedded policy's checkpoint is looked for: $MEDGYM_EMBEDDED_POLICY, else package data."""
    env = os.environ.get("MEDGYM_EMBEDDED_POLICY")
    return Path(env) if env else EMBEDDED_POLICY_DIR


EMBEDDED_IMAGE_SIZE = 128  # the embedded policy's pictures: 8 x 8 patches of 16 px, merged 2 x 2
EMBEDDED_MAX_NEW_TOKENS = 128


def embedded_turn_limits(max_new_tokens: int = EMBEDDED_MAX_NEW_TOKENS) -> Any:
    """The embedded policy's constrained turn (:class:`~medgym.agents.constrained.TurnLimits`): no thoughts and
    one call, as it was trained, the answer and each string within ``max_new_tokens``. GRPO's rollouts use the
    same limits, so a policy is trained under the grammar it is evaluated with."""
    from medgym.agents.constrained import TurnLimits

    return replace(TurnLimits.for_budget(max_new_tokens), thought_chars=0, max_calls=1)


# package data: the default (SFT + GRPO when GRPO measured better), and SFT alone
SHIPPED_CHECKPOINTS = ("embedded", "embedded-sft")


def embedded_path(name_or_path: str | Path | None) -> Path:
    """A shipped checkpoint by name (:data:`SHIPPED_CHECKPOINTS`) or a folder path."""
    if name_or_path in (None, "", "embedded"):
        return default_embedded_path()
    if str(name_or_path) in SHIPPED_CHECKPOINTS:
        return CHECKPOINTS_DIR / str(name_or_path)
    return Path(name_or_path)


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    meta_file = Path(path) / "medgym.json"
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


class EmbeddedBackend(TransformersBackend):
    """The project's own small policy: a checkpoint written by ``medgym train`` (the shipped one by default).

    Training lives in ``medgym.rl`` (never imported here); this only loads what training saved and
    prompts it as it was trained: its recorded system text, 128-px letterboxed pictures, the tool
    list unless it is a no-tools baseline. Constrained, its turns start with a tag and hold one call at
    most: it was trained on turns without thoughts and with one call each, so free text before the calls
    would only be noise, and a second call in the turn only a way to run out of its token budget.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str | None = None,
        max_new_tokens: int = EMBEDDED_MAX_NEW_TOKENS,
        constrained: bool = False,
    ):
        path = embedded_path(checkpoint)
        if not (path / "config.json").is_file():
            raise BackendUnavailable(ERR_NO_EMBEDDED.format(path=path))
        meta = checkpoint_meta(path)
        limits = embedded_turn_limits(max_new_tokens)
        super().__init__(
            path,
            device=device or "cpu",
            max_new_tokens=max_new_tokens,
            model_id=str(meta.get("model_id", f"embedded:{path.name}")),
            system_prompt=meta.get("system_prompt"),
            image_size=int(meta.get("image_size", EMBEDDED_IMAGE_SIZE)),
            tools=bool(meta.get("tools", True)),
            tool_schemas=meta.get("tool_schemas"),  # prompted as trained, like its system text
            attn_implementation="sdpa",  # ~2x faster than eager on its ~1,200-token prompts (same greedy turns)
            constrained=constrained,
            turn_limits=limits,
        )
        self.meta = meta


# ----------------------------------------------------------------------------- specs


def parse_spec(spec: str) -> tuple[str, str]:
    """``name[:argument]`` (``openai:MODEL@URL`` keeps its URL's colons).

    >>> parse_spec("openai:qwen@http://127.0.0.1:8000/v1")
    ('openai', 'qwen@http://127.0.0.1:8000/v1')
    >>> parse_spec("embedded")
    ('embedded', '')
    """
    name, _, arg = spec.partition(":")
    return name, arg


def make_policy(spec: str, *, case: Case | None = None, tool_mode: str = DEFAULT_TOOL_MODE, **options: Any) -> Policy:
    """A policy from its spec (see the module docstring); ``case`` binds the expert, other options go to the backend.

    Legacy options still work: ``--backend transformers --model PATH`` (``model_path``), ``--backend openai
    --model NAME --base-url URL``, ``--backend embedded --checkpoint PATH``. ``constrained=True`` decodes
    model policies under the turn grammar (:mod:`medgym.agents.constrained`); scripted ones ignore it.
    """
    name, arg = parse_spec(spec)
    device = options.get("device")
    constrained = bool(options.get("constrained", False))
    if name == "expert" and not arg:
        return ExpertPolicy(case, tool_mode)  # without a case: bound per episode through for_case
    if name == "demo" and not arg:
        return DemoBackend()
    if name == "prior":
        from medgym.environments.policies import AnswerPriorPolicy

        if arg and not arg.isdigit():
            raise BackendUnavailable(f"prior:N takes a number of training cases to fit on, not {arg!r}")
        return AnswerPriorPolicy(str(options.get("source") or "phantom"), int(arg or 1000))
    if name in ("embedded", "embedded-sft"):
        return EmbeddedBackend(arg or options.get("checkpoint") or name, device=device, constrained=constrained)
    if name == "transformers":
        path = arg or options.get("model_path")
        if not path:
            raise BackendUnavailable(ERR_NEEDS_PATH.format(name=name))
        return TransformersBackend(path, device=device, constrained=constrained)
    if name == "openai":
        model, _, url = arg.partition("@")
        model = model or options.get("model") or "default"
        return OpenAIBackend(model, url or options.get("base_url"), options.get("api_key"), constrained=constrained)
    raise BackendUnavailable(ERR_UNKNOWN_POLICY.format(spec=spec))


def make_backend(name: str, **options: Any) -> Policy:
    """The chat's name for :func:`make_policy` (``--backend`` takes the same specs)."""
    return make_policy(name, **options)
