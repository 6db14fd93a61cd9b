"""``medgym check --model DIR [--fix OUT]`` on templates written here to break each part of the contract.

Each broken template is a small Qwen-style template (or medgym's own with one part taken out); the
check must fail naming the cause and the fix, ``--fix OUT`` must write a copy that passes, and the
transformers backend must prompt the repaired copy with every image.
"""

from __future__ import annotations

import json
import shutil

import pytest

from medgym.cli import main
from medgym.models.contract_check import (
    ERR_FEATURES,
    ERR_PLACEHOLDERS,
    ERR_PREFIX,
    ERR_TOOL_IMAGES,
    ERR_TOOLS_MISSING,
    FIX_MANUAL,
    FIX_MOVE,
    FIX_TEMPLATE,
    NOTE_MOVED,
    check_model,
    probe_messages,
)
from medgym.models.zoo import chat_template
from medgym.tools import TOOLS


def qwen_style(*, tools=True, tool_images=True, placeholder_repeat=1, strip_earlier_thoughts=False) -> str:
    """A Qwen-format tool template; each flag turned off breaks one part of the contract."""
    image = "<|vision_start|><|image_pad|><|vision_end|>" * placeholder_repeat
    tool_block = (
        "{%- if tools %}\n\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>{% endif %}"
        if tools
        else ""
    )
    keep_image = "true" if tool_images else "m.role != 'tool'"
    text = (
        "{%- if strip and m.role == 'assistant' and not is_last and '<tool_call>' in p.text -%}"
        "{{ '<tool_call>' ~ p.text.split('<tool_call>', 1)[1] }}{%- else -%}{{ p.text }}{%- endif -%}"
    )
    return (
        "{%- set strip = " + ("true" if strip_earlier_thoughts else "false") + " -%}"
        "<|im_start|>system\n{{ messages[0].content[0].text }}" + tool_block + "<|im_end|>\n"
        "{%- for m in messages[1:] %}{%- set is_last = loop.last -%}"
        "<|im_start|>{{ ('user' if m.role == 'tool' else m.role) ~ '\\n' }}"
        "{%- if m.role == 'tool' %}<tool_response>\n{% endif -%}"
        "{%- for p in m.content -%}"
        "{%- if p.type == 'image' -%}{%- if " + keep_image + " -%}" + image + "{%- endif -%}"
        "{%- elif p.type == 'text' -%}" + text + "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if m.role == 'tool' %}\n</tool_response>{% endif %}<|im_end|>\n"
        "{%- endfor -%}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}"
    )


def with_template(src, dst, template: str):
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(template)
    return dst


# (template, failing check, the error's fixed text, the repair --fix makes, the template it records)
BROKEN = {
    "a_drops_tool_images": (
        qwen_style(tool_images=False),
        "tool_images",
        ERR_TOOL_IMAGES.split(":")[0],
        FIX_MOVE,
        "move_tool_images+original",
    ),
    "b_two_placeholders_per_image": (
        qwen_style(placeholder_repeat=2),
        "placeholders",
        ERR_PLACEHOLDERS.format(n=4, token="<|image_pad|>", k=2),
        FIX_TEMPLATE.format(template="trl/qwen3_vl", arch="qwen2_vl"),
        "trl/qwen3_vl",
    ),
    "c_strips_earlier_thoughts": (
        qwen_style(strip_earlier_thoughts=True),
        "prefix",
        ERR_PREFIX.split(":")[0],
        FIX_TEMPLATE.format(template="trl/qwen3_vl", arch="qwen2_vl"),
        "trl/qwen3_vl",
    ),
    "d_ignores_tools": (
        qwen_style(tools=False),
        "tools",
        ERR_TOOLS_MISSING.format(missing=", ".join(sorted(TOOLS))),
        FIX_TEMPLATE.format(template="trl/qwen3_vl", arch="qwen2_vl"),
        "trl/qwen3_vl",
    ),
}


def test_the_unbroken_qwen_style_template_passes(zoo_dir, tmp_path):
    report = check_model(with_template(zoo_dir("qwen2_vl"), tmp_path / "m", qwen_style()))
    assert report.ok, report.as_dict()


@pytest.mark.parametrize("case", list(BROKEN))
def test_check_names_the_cause_and_fix_repairs_it(case, zoo_dir, tmp_path, capsys):
    template, name, error, repair, recorded = BROKEN[case]
    bad = with_template(zoo_dir("qwen2_vl"), tmp_path / "bad", template)

    assert main(["check", "--model", str(bad)]) == 1
    out = capsys.readouterr().out
    fail = next(line for line in out.splitlines() if line.startswith(f"FAIL {name}:"))
    assert error in fail
    assert f"     fix: {repair}" in out and "repairable:" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("FAIL")] == [f"{name}:"]

    fixed = tmp_path / "fixed"
    assert main(["check", "--model", str(bad), "--fix", str(fixed)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"{fixed}: passed")
    meta = json.loads((fixed / "medgym.json").read_text())
    assert meta["template"] == recorded and meta["repaired_from"] == str(bad) and meta["arch"] == "qwen2_vl"
    new_template = (fixed / "chat_template.jinja").read_text()
    if recorded == "move_tool_images+original":
        assert new_template.endswith(template)  # the folder's own template is kept behind the preamble
    else:
        assert new_template == chat_template(recorded)
    # weights are linked or copied, and the bad folder is left as it was
    assert (fixed / "model.safetensors").read_bytes() == (bad / "model.safetensors").read_bytes()
    assert (bad / "chat_template.jinja").read_text() == template


def test_backend_prompts_a_repaired_model_with_every_image(zoo_dir, tmp_path):
    from medgym.agents.backends import TransformersBackend
    from medgym.models.contract_check import count_image_features, image_token_ids

    bad = with_template(zoo_dir("qwen2_vl"), tmp_path / "bad", qwen_style(tool_images=False))
    fixed = tmp_path / "fixed"
    assert main(["check", "--model", str(bad), "--fix", str(fixed)]) == 0
    backend = TransformersBackend(fixed, device="cpu", dtype="float32")
    messages = probe_messages()[:-1]  # up to the tool's result: the model's turn is next
    prompt = backend.render(messages)
    assert prompt.count("<|image_pad|>") == 2 and NOTE_MOVED in prompt
    assert prompt.index("</tool_response>") < prompt.index(NOTE_MOVED)  # the crop follows its tool turn
    calls = []
    original = backend.model.generate
    backend.model.generate = lambda **kw: calls.append(kw) or original(**kw)
    assert isinstance(backend.next_turn(messages), str)
    (call,) = calls
    assert call["image_grid_thw"].shape[0] == 2
    import torch

    ids = torch.tensor(image_token_ids(backend.processor, backend.model))
    assert int(torch.isin(call["input_ids"], ids).sum()) == count_image_features(backend.model, call)


def test_fix_writes_the_arch_template_for_gemma3(zoo_dir, tmp_path, capsys):
    """medgym's own gemma3 template with its tool block taken out: --fix writes the whole one back."""
    own = chat_template("medgym/tool_chat:gemma3")
    broken = own.replace("{%- if tools -%}", "{%- if false -%}", 1)
    assert broken != own
    bad = with_template(zoo_dir("gemma3"), tmp_path / "bad", broken)
    assert main(["check", "--model", str(bad), "--fix", str(tmp_path / "fixed")]) == 0
    out = capsys.readouterr().out
    assert "FAIL tools:" in out and FIX_TEMPLATE.format(template="medgym/tool_chat:gemma3", arch="gemma3") in out
    assert (tmp_path / "fixed" / "chat_template.jinja").read_text() == own


def test_image_features_mismatch_cannot_be_repaired(zoo_dir, tmp_path, capsys):
    """A processor that expands images into the wrong number of tokens: the check says so; --fix writes nothing."""
    bad = tmp_path / "bad"
    shutil.copytree(zoo_dir("smolvlm"), bad)
    config_file = bad / "processor_config.json"
    config = json.loads(config_file.read_text())
    assert config["image_seq_len"] == 16
    config_file.write_text(json.dumps({**config, "image_seq_len": 9}))

    assert main(["check", "--model", str(bad), "--fix", str(tmp_path / "fixed")]) == 1
    out = capsys.readouterr().out
    assert "FAIL image_features: " + ERR_FEATURES.format(k=2, n=18, m=32) in out
    assert FIX_MANUAL["image_features"] in out and "nothing written" in out
    assert not (tmp_path / "fixed").exists()


def test_check_without_a_model_folder_says_what_is_missing(tmp_path):
    with pytest.raises(SystemExit, match="no model in"):
        main(["check", "--model", str(tmp_path)])
    with pytest.raises(SystemExit, match="--fix OUT needs --model DIR"):
        main(["check", "--fix", str(tmp_path / "out")])


def test_check_of_a_passing_model_with_fix_writes_an_unchanged_copy(zoo_dir, tmp_path, capsys):
    src = zoo_dir("qwen3_vl")
    assert main(["check", "--model", str(src), "--fix", str(tmp_path / "copy")]) == 0
    assert "unchanged: nothing to repair" in capsys.readouterr().out
    assert (tmp_path / "copy" / "chat_template.jinja").read_text() == (src / "chat_template.jinja").read_text()
