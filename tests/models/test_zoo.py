"""``medgym model init``: tiny random models of real architectures, built offline, that load with Auto classes.

For every architecture: the folder loads with ``AutoProcessor`` / ``AutoModelForImageTextToText``,
its ``medgym.json`` says what it is, its template renders ``tools=`` and tool images, ``medgym check
--model`` passes, ``medgym eval --policy transformers:DIR`` runs, and in the chat graph a turn after
an image-returning tool call gets the pixels of both pictures, as many image tokens as features.
"""

from __future__ import annotations

import json

import pytest
import torch

from medgym.cli import main
from medgym.models.zoo import ARCHS, ERR_ARCH, MAX_NEW_TOKENS, build, chat_template, init_model

ARCH_NAMES = list(ARCHS)
ZOOM = '<tool_call>{"name": "zoom", "arguments": {"boxes": [[64, 64, 192, 192]]}}</tool_call>'


def n_images(inputs: dict) -> int:
    """Images in one processor batch, read from the architecture's own image inputs."""
    if "image_grid_thw" in inputs:  # Qwen family: one grid row per image
        return int(inputs["image_grid_thw"].shape[0])
    pixels = inputs["pixel_values"]
    return int(pixels.shape[1] if pixels.ndim == 5 else pixels.shape[0])  # Idefics3: (batch, images, ...)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_init_saves_a_folder_the_auto_classes_load(arch, zoo_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = zoo_dir(arch)
    meta = json.loads((folder / "medgym.json").read_text())
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert meta["arch"] == arch and meta["size"] == "tiny" and meta["seed"] == 0
    assert meta["template"] == ARCHS[arch].template
    assert meta["parameters"] == sum(p.numel() for p in model.parameters()) < 1_000_000
    assert type(model).__name__ == meta["model_class"]
    assert processor.chat_template == chat_template(ARCHS[arch].template)
    assert model.generation_config.max_new_tokens == MAX_NEW_TOKENS["tiny"]
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id is not None
    # the project's tokenizer: tool-call tags are whole tokens that decoding keeps
    tok = processor.tokenizer
    ids = tok("<tool_call>{}</tool_call>", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0] == "<tool_call>"
    assert tok.decode(ids, skip_special_tokens=True) == "<tool_call>{}</tool_call>"


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_template_renders_tools_and_tool_images(arch, zoo_dir):
    from transformers import AutoProcessor

    from medgym.agents.backends import chat_conversation
    from medgym.environments.contract import tool_schemas
    from medgym.models.contract_check import probe_messages

    processor = AutoProcessor.from_pretrained(zoo_dir(arch))
    conversation = chat_conversation(probe_messages())
    text = processor.apply_chat_template(conversation, tools=tool_schemas(), tokenize=False)
    assert all(f'"name": "{s["function"]["name"]}"' in text for s in tool_schemas())
    assert text.count(processor.image_token) == 2  # the question's picture and the tool's crop
    tool_turn = text[text.index("<tool_response>") : text.index("</tool_response>")]
    assert processor.image_token in tool_turn and "[zoom] crop 1" in tool_turn


def test_seed_fixes_the_weights():
    a, _ = build("gemma3", seed=3)
    b, _ = build("gemma3", seed=3)
    c, _ = build("gemma3", seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(pa[name], pb[name]) and not torch.equal(pa[name], pc[name])


def test_init_cli_prints_the_record_and_rejects_unknown_archs(tmp_path, capsys):
    assert main(["model", "init", "--arch", "smolvlm", "--out", str(tmp_path / "m"), "--seed", "7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["arch"] == "smolvlm" and printed["seed"] == 7 and printed["out"] == str(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "medgym.json").read_text())["parameters"] == printed["parameters"]
    with pytest.raises(SystemExit):
        main(["model", "init", "--arch", "llama9_vl", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="unknown architecture 'llama9_vl'"):
        init_model("llama9_vl", tmp_path / "x")
    assert ERR_ARCH.startswith("unknown architecture")


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_check_model_passes(arch, zoo_dir, capsys):
    assert main(["check", "--model", str(zoo_dir(arch))]) == 0
    out = capsys.readouterr().out
    for name in ("tools", "tool_images", "placeholders", "prefix", "image_features"):
        assert f"ok   {name}:" in out
    assert "FAIL" not in out and out.rstrip().endswith("passed")


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_eval_runs_the_model_as_a_policy(arch, zoo_dir, capsys):
    policy = f"transformers:{zoo_dir(arch)}"
    assert main(["eval", "--policy", policy, "--n", "2", "--json", "--segmenter", "threshold"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 2 and summary["policy"] == f"transformers:{arch}"
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["format_errors"] >= 0  # random weights: garbage allowed


class ZoomThenModel:
    """A scripted first turn (zoom, which returns a crop), then the model; records what reaches generate."""

    def __init__(self, backend):
        self.backend = backend
        self.model_id = backend.model_id
        self.calls: list[dict] = []
        original = backend.model.generate

        def recording_generate(**kwargs):
            self.calls.append(kwargs)
            return original(**kwargs)

        backend.model.generate = recording_generate

    def next_turn(self, messages, *, temperature=0.0):
        if not any(m["role"] == "tool" for m in messages):
            return ZOOM
        return self.backend.next_turn(messages, temperature=temperature)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_chat_graph_feeds_the_question_and_tool_images_to_the_model(arch, zoo_dir, tmp_path):
    from medgym.agents.backends import TransformersBackend
    from medgym.agents.graph import AgentContext
    from medgym.agents.session import ChatAgent
    from medgym.models.contract_check import count_image_features, image_token_ids

    backend = TransformersBackend(zoo_dir(arch), device="cpu", dtype="float32")
    policy = ZoomThenModel(backend)
    ctx = AgentContext(backend=policy, data_dir=str(tmp_path), max_steps=2, segmenter="threshold")
    with ChatAgent(tmp_path / "c.sqlite", ctx) as agent:
        done = agent.run("t", "", {"kind": "phantom", "seed": 2})
        history = agent.history("t")
    tool = next(m for m in history if m["role"] == "tool")
    assert tool["name"] == "zoom" and len(tool["images"]) == 1 and done["status"] != "error"
    (call,) = policy.calls  # one model turn, after the zoom
    assert n_images(call) == 2  # the question's picture and the zoom's crop
    ids = torch.tensor(image_token_ids(backend.processor, backend.model))
    n_tokens = int(torch.isin(call["input_ids"], ids).sum())
    assert n_tokens > 0 and n_tokens == count_image_features(backend.model, call)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.startswith("qwen")])
def test_backend_turns_with_the_cached_system_turn_equal_plain_turns(arch, zoo_dir):
    """Every multimodal-RoPE architecture decodes the same turns whether its system turn is cached or run each turn."""
    import gymnasium as gym

    from medgym.agents.backends import TransformersBackend
    from medgym.environments.evaluate import ENV_ID, run_episode

    turns: dict[bool, list[str]] = {True: [], False: []}
    for cached in (True, False):
        backend = TransformersBackend(zoo_dir(arch), device="cpu", max_new_tokens=24, constrained=True)
        backend.prefix_cache = cached
        next_turn = backend.next_turn

        def keep(messages, *, temperature=0.0, _next=next_turn, _out=turns[cached]):
            _out.append(_next(messages, temperature=temperature))
            return _out[-1]

        backend.next_turn = keep
        env = gym.make(ENV_ID, source="phantom", tool_mode="predicted", segmenter="threshold")
        for seed in (0, 1):
            run_episode(env, backend, seed)
        assert (backend._prefix is not None) == cached
    assert len(turns[True]) >= 4 and turns[True] == turns[False]
