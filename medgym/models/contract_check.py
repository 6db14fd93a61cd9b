"""The tool-image contract of a model folder: ``medgym check --model DIR [--fix OUT]``.

A model runs in medgym's loop only if its chat template and processor honour four things, checked
on one probe conversation (system, a question with an image, a tool call, a ``tool`` message with an
image and text, an answer) rendered exactly as :class:`medgym.agents.backends.TransformersBackend`
prompts it (``tools=`` :func:`medgym.environments.contract.tool_schemas`):

- ``tools``: the template renders ``tools=`` (every tool name appears, nothing raises);
- ``tool_images``: images in ``tool`` messages reach the prompt (crops and overlays are what tools return);
- ``placeholders``: one image placeholder per image given; ``image_features``: the processor expands
  them into as many image tokens as the vision tower makes image features;
- ``prefix``: rendering turn k (with the generation prompt) is a prefix of rendering turn k + 1, which
  GRPO's multi-turn loop relies on.

Repairs are chat templates, tried before they are offered: when only ``tool_images`` fails, the
folder's template is kept behind a preamble that moves tool images into a user turn after the tool
turn (``templates/move_tool_images.jinja``); otherwise medgym's own template for the architecture
(:mod:`medgym.models.zoo`). :func:`write_repaired` writes a copy of the folder with the repaired
``chat_template.jinja`` (weights hard-linked where possible) and, with medgym's own template, that
template's ``response_template`` in ``tokenizer_config.json`` (GRPO parses tool calls with it); it
then passes the check. A processor whose image tokens disagree with the model's vision tower cannot
be repaired by a template.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgym.environments.case import ToolCall
from medgym.environments.contract import Message, system_prompt, tool_schemas

log = logging.getLogger(__name__)

ERR_NO_MODEL = "no model in {path}: expected a folder with config.json (a `save_pretrained` folder)"
ERR_TOOLS_RAISE = "the chat template fails when given tools=: {exc}"
ERR_TOOLS_MISSING = "the chat template ignores tools=: the prompt does not name the tools {missing}"
ERR_TOOL_RAISE = "the chat template cannot render the probe conversation with a tool message: {exc}"
ERR_TOOL_IMAGES = "the chat template drops images in tool messages: the tool's image adds no {token!r} to the prompt"
ERR_PLACEHOLDERS = "the prompt has {n} image placeholder(s) {token!r} for the {k} images given"
ERR_PROCESS = "the processor fails on the rendered prompt and its images: {exc}"
ERR_FEATURES = (
    "the processor expands the {k} images into {n} image tokens but the vision tower makes {m} image features"
)
ERR_PREFIX = (
    "the chat template is not prefix-preserving: adding the {role} turn re-renders what came before "
    "(from character {i}: {before!r} becomes {after!r})"
)
SKIP_PLACEHOLDERS = "not checked: tool images do not reach the prompt (see tool_images)"
SKIP_FEATURES = "not checked: no template renders one placeholder per image"

FIX_MOVE = "--fix moves tool images into a user turn after the tool turn, keeping the rest of the template"
FIX_TEMPLATE = "--fix writes the {template} chat template (the one medgym's {arch} models use)"
FIX_MANUAL = {
    "tools": "write a chat template that renders `tools` (e.g. a <tools> block in the system turn)",
    "tool_images": "write a chat template that renders the image parts of tool messages",
    "placeholders": "write a chat template that emits the processor's image placeholder once per image part",
    "prefix": "write a chat template that renders every message the same whatever follows it",
    "image_features": (
        "make the processor's image settings (preprocessor_config.json / processor_config.json: patch and merge "
        "sizes, image_seq_len) match the model's vision config; a chat template cannot repair this"
    ),
}
NOTE_MOVED = "(The images of the tool results above.)"


@dataclass
class Finding:
    """One part of the contract: passed (True), failed (False) or not checked (None); ``fix`` says how to mend it."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""


@dataclass
class Repair:
    """A chat template that makes every template check pass."""

    name: str  # "move_tool_images" or "template"
    template: str
    template_name: str
    description: str


@dataclass
class ContractReport:
    path: str
    model_type: str
    findings: list[Finding] = field(default_factory=list)
    repair: Repair | None = None

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    @property
    def repairable(self) -> bool:
        """Whether ``--fix`` mends every failure (image features need the processor fixed, not the template)."""
        return self.repair is not None and all(f.ok or f.name != "image_features" for f in self.findings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "model_type": self.model_type,
            "ok": self.ok,
            "findings": [vars(f) for f in self.findings],
            "repair": self.repair.template_name if self.repair else None,
        }


# ----------------------------------------------------------------------------- the probe


def probe_images() -> list[np.ndarray]:
    """The question's picture and the tool's crop: deterministic gradients of different sizes."""
    y, x = np.mgrid[0:96, 0:96]
    question = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.uint8)
    crop = np.ascontiguousarray(question[16:64, 8:72][::-1])
    return [question, crop]


def probe_messages() -> list[Message]:
    """System, question with an image, a zoom call, the zoom's result with an image, an answer."""
    question, crop = probe_images()
    call = ToolCall("zoom", {"boxes": [[8, 16, 72, 64]]})
    return [
        {"role": "system", "content": system_prompt(), "images": []},
        {
            "role": "user",
            "content": "CT image, 96 x 96 pixels. What is the longest diameter of the lesion in mm?",
            "images": [question],
        },
        {"role": "assistant", "content": "I zoom on the lesion first." + call.as_text(), "images": []},
        {
            "role": "tool",
            "name": "zoom",
            "content": "[zoom] crop 1: box [8, 16, 72, 64], shown at 2x",
            "images": [crop],
        },
        {"role": "assistant", "content": "<answer>12</answer>", "images": []},
    ]


def _without_tool_images(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in conversation:
        if m["role"] == "tool":
            m = {**m, "content": [p for p in m["content"] if p.get("type") != "image"]}
        out.append(m)
    return out


def _n_images(conversation: list[dict[str, Any]]) -> int:
    return sum(p.get("type") == "image" for m in conversation for p in m["content"] if isinstance(p, dict))


# ----------------------------------------------------------------------------- template checks


class _Renderer:
    """Renders conversations through a processor with a given chat template."""

    def __init__(self, processor, template: str | None, tools: list[dict[str, Any]] | None):
        self.processor = processor
        self.template = template
        self.tools = tools

    def __call__(self, conversation: list[dict[str, Any]], generation: bool = False, tools: bool = True) -> str:
        return self.processor.apply_chat_template(
            conversation,
            chat_template=self.template,
            tools=self.tools if tools else None,
            add_generation_prompt=generation,
            tokenize=False,
        )


def check_tools(render: _Renderer, conversation: list[dict[str, Any]]) -> Finding:
    names = [s["function"]["name"] for s in render.tools or []]
    try:
        with_tools = render(conversation)
        without = render(conversation, tools=False)
    except Exception as exc:  # any template error is a finding, never a crash of the check
        return Finding("tools", False, ERR_TOOLS_RAISE.format(exc=_short(exc)))
    # Tool names may also occur in the system text: the tool block must add each of them.
    missing = [n for n in names if with_tools.count(n) <= without.count(n)]
    if missing:
        return Finding("tools", False, ERR_TOOLS_MISSING.format(missing=", ".join(missing)))
    return Finding("tools", True, f"tools= renders all {len(names)} tools")


def check_tool_images(render: _Renderer, conversation: list[dict[str, Any]], token: str | None) -> Finding:
    try:
        full = render(conversation)
        without = render(_without_tool_images(conversation))
    except Exception as exc:
        return Finding("tool_images", False, ERR_TOOL_RAISE.format(exc=_short(exc)))
    dropped = full == without if token is None else full.count(token) == without.count(token)
    if dropped:
        return Finding("tool_images", False, ERR_TOOL_IMAGES.format(token=token or "image"))
    return Finding("tool_images", True, "images in tool messages reach the prompt")


def check_placeholders(render: _Renderer, conversation: list[dict[str, Any]], token: str | None) -> Finding:
    k = _n_images(conversation)
    if token is None:
        return Finding("placeholders", None, "not checked: the processor names no image placeholder token")
    try:
        n = render(conversation).count(token)
    except Exception as exc:
        return Finding("placeholders", False, ERR_TOOL_RAISE.format(exc=_short(exc)))
    if n != k:
        return Finding("placeholders", False, ERR_PLACEHOLDERS.format(n=n, token=token, k=k))
    return Finding("placeholders", True, f"{n} placeholders {token!r} for {k} images")


def check_prefix(render: _Renderer, conversation: list[dict[str, Any]]) -> Finding:
    """Each history rendered with the generation prompt, then with the assistant turn, then with the next tool turn."""
    try:
        steps = [
            (
                conversation[i - 1]["role"],
                render(conversation[:i], generation=conversation[i - 1]["role"] != "assistant"),
            )
            for i in range(2, len(conversation) + 1)
        ]
    except Exception as exc:
        return Finding("prefix", False, ERR_TOOL_RAISE.format(exc=_short(exc)))
    for (_, before), (role, after) in zip(steps, steps[1:], strict=False):
        if not after.startswith(before):
            i = next((j for j, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), len(after))
            return Finding(
                "prefix", False, ERR_PREFIX.format(role=role, i=i, before=before[i : i + 40], after=after[i : i + 40])
            )
    return Finding("prefix", True, f"{len(steps)} renderings, each a prefix of the next")


def template_findings(processor, template: str | None, conversation: list[dict[str, Any]]) -> list[Finding]:
    """The template's part of the contract (``tools``, ``tool_images``, ``placeholders``, ``prefix``)."""
    render = _Renderer(processor, template, tool_schemas())
    tools = check_tools(render, conversation)
    if tools.ok is False:
        render.tools = None  # judge the rest without the part that is already known to fail
    token = getattr(processor, "image_token", None)
    tool_images = check_tool_images(render, conversation, token)
    placeholders = (
        check_placeholders(render, conversation, token)
        if tool_images.ok
        else Finding("placeholders", None, SKIP_PLACEHOLDERS)
    )
    return [tools, tool_images, placeholders, check_prefix(render, conversation)]


# ----------------------------------------------------------------------------- image features


def image_token_ids(processor, model) -> list[int]:
    ids = [i for i in (getattr(processor, "image_token_ids", None) or []) if i is not None]
    if not ids:
        config_id = getattr(model.config, "image_token_id", None) or getattr(model.config, "image_token_index", None)
        ids = [config_id] if config_id is not None else []
    return ids


def feature_rows(output: Any) -> int:
    """Rows of image features in what ``get_image_features`` returns (a tensor, a list of them, or a model output)."""
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        output = pooled
    elif not isinstance(output, torch.Tensor | list | tuple):
        output = output[0]
    if isinstance(output, torch.Tensor):
        return output.numel() // output.shape[-1]
    return sum(feature_rows(o) for o in output)


def count_image_features(model, inputs: dict[str, Any]) -> int:
    """Image features the model makes from the processor's outputs (its ``get_image_features``)."""
    accepted = inspect.signature(model.get_image_features).parameters
    kwargs = {k: v for k, v in inputs.items() if k in accepted and k != "input_ids"}
    with torch.inference_mode():
        return feature_rows(model.get_image_features(**kwargs))


def check_image_features(processor, model, template: str | None, conversation: list[dict[str, Any]]) -> Finding:
    k = _n_images(conversation)
    try:
        inputs = processor.apply_chat_template(
            conversation,
            chat_template=template,
            tools=tool_schemas(),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    except Exception as exc:
        return Finding("image_features", False, ERR_PROCESS.format(exc=_short(exc)), FIX_MANUAL["image_features"])
    ids = image_token_ids(processor, model)
    n = int(torch.isin(inputs["input_ids"], torch.tensor(ids)).sum())
    m = count_image_features(model, dict(inputs))
    if n != m:
        return Finding("image_features", False, ERR_FEATURES.format(k=k, n=n, m=m), FIX_MANUAL["image_features"])
    return Finding("image_features", True, f"{n} image tokens = {m} image features ({k} images)")


# ----------------------------------------------------------------------------- repairs


def _template_text(name: str) -> str:
    return resources.files("medgym.models").joinpath(f"templates/{name}").read_text()


def move_tool_images(template: str) -> str:
    """``template`` behind the preamble that moves tool images into a user turn after the tool turn."""
    preamble = _template_text("move_tool_images.jinja").replace("MEDGYM_NOTE", json.dumps(NOTE_MOVED))
    return preamble + template


def candidate_repairs(template: str | None, findings: list[Finding], model_type: str) -> list[Repair]:
    """The repairs worth trying, least invasive first."""
    from medgym.models.zoo import arch_for_model_type, chat_template

    failed = {f.name for f in findings if f.ok is False}
    out = []
    if template and failed == {"tool_images"}:
        out.append(Repair("move_tool_images", move_tool_images(template), "move_tool_images+original", FIX_MOVE))
    arch = arch_for_model_type(model_type)
    if arch is not None:
        out.append(
            Repair(
                "template",
                chat_template(arch.template),
                arch.template,
                FIX_TEMPLATE.format(template=arch.template, arch=arch.name),
            )
        )
    return out


def check_contract(processor, model, model_type: str = "", path: str = "") -> ContractReport:
    """Check a loaded processor and model (the processor's own chat template) and find a repair if needed."""
    from medgym.agents.backends import chat_conversation

    conversation = chat_conversation(probe_messages())
    template = getattr(processor, "chat_template", None)
    findings = template_findings(processor, template, conversation)
    report = ContractReport(path=path, model_type=model_type)
    failed = [f for f in findings if f.ok is False]
    features_template: str | None = template
    if failed:
        for candidate in candidate_repairs(template, findings, model_type):
            if all(f.ok for f in template_findings(processor, candidate.template, conversation)):
                report.repair = candidate
                break
        features_template = report.repair.template if report.repair else None
        for f in failed:
            f.fix = report.repair.description if report.repair else FIX_MANUAL[f.name]
    placeholders_ok = next(f.ok for f in findings if f.name == "placeholders")
    if placeholders_ok or report.repair is not None:
        findings.append(check_image_features(processor, model, features_template, conversation))
    else:
        findings.append(Finding("image_features", None, SKIP_FEATURES))
    report.findings = findings
    return report


def load_for_check(path: str | Path):
    """The model folder as the transformers backend loads it (its processor, its template fallback), on the CPU."""
    from medgym.agents.backends import TransformersBackend

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(ERR_NO_MODEL.format(path=path))
    return TransformersBackend(path, device="cpu", dtype="float32")


def check_model(path: str | Path) -> ContractReport:
    """The contract report of a model folder."""
    backend = load_for_check(path)
    return check_contract(backend.processor, backend.model, backend.model.config.model_type, str(path))


CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
CONFIGS_WITH_TEMPLATES = ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def write_repaired(src: str | Path, out: str | Path, repair: Repair | None) -> Path:
    """A copy of ``src`` in ``out`` (weights hard-linked where possible) with the repaired chat template.

    Templates stored elsewhere (``chat_template.json``, a ``chat_template`` key in a config, a
    ``chat_templates/`` folder) are left out, so the new ``chat_template.jinja`` is the one loaded.
    An architecture's template brings its tool-call parser (:func:`medgym.models.zoo.response_template`)
    into ``tokenizer_config.json`` in place of the folder's; TRL's own template gets TRL's from GRPO.
    """
    from medgym.models.zoo import response_template

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError("--fix needs a new folder, not the model folder itself")
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = out / item.name
        if repair is not None and (item.name in CHAT_TEMPLATE_FILES or item.name == "chat_templates"):
            continue
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        elif repair is not None and item.name in CONFIGS_WITH_TEMPLATES:
            config = json.loads(item.read_text())
            config.pop("chat_template", None)
            if repair.name == "template" and item.name == "tokenizer_config.json":
                config.pop("response_template", None)  # it parses the folder's template, not the new one
                parsing = response_template(repair.template_name)
                if parsing is not None:
                    config["response_template"] = parsing
            target.write_text(json.dumps(config, indent=2) + "\n")
        elif item.suffix in (".safetensors", ".bin", ".pt"):
            _link_or_copy(item, target)
        elif item.name != "medgym.json":
            shutil.copy2(item, target)
    meta = json.loads((src / "medgym.json").read_text()) if (src / "medgym.json").is_file() else {}
    if repair is not None:
        (out / "chat_template.jinja").write_text(repair.template)
        meta.update({"template": repair.template_name, "repair": repair.name, "repaired_from": str(src)})
    (out / "medgym.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def _link_or_copy(item: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(item, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(item, target)


def _short(exc: Exception, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = [
    "ContractReport",
    "Finding",
    "Repair",
    "check_contract",
    "check_model",
    "probe_messages",
    "write_repaired",
]
