"""Config dataclasses: YAML + overrides, validation that names the fix, fp32 on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_shipped_configs_load():
    from medgym.rl.config import GRPOConfigMedgym, SFTConfig, load_config

    sft = load_config(SFTConfig, CONFIGS / "sft_embedded.yaml")
    grpo = load_config(
        GRPOConfigMedgym, CONFIGS / "grpo_embedded.yaml", ["--max_steps", "3", "--train-seeds=[1000, 8]"]
    )
    assert sft.size == "small" and grpo.max_steps == 3 and grpo.train_seeds == [1000, 8]


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        ("SFTConfig", {"size": "huge"}, "size must be one of"),
        ("SFTConfig", {"train_seeds": [0, 10], "eval_seeds": [5, 10]}, "overlap"),
        ("SFTConfig", {"train_seeds": [0]}, r"\[first_seed, count\]"),
        ("GRPOConfigMedgym", {"per_device_train_batch_size": 6, "num_generations": 4}, "multiple of"),
        ("GRPOConfigMedgym", {"num_generations": 1, "per_device_train_batch_size": 1}, "num_generations must be >= 2"),
    ],
)
def test_bad_values_are_refused_with_a_fix(cls, values, message):
    from medgym.rl import config

    with pytest.raises(ValueError, match=message):
        getattr(config, cls)(**values)


def test_yaml_numbers_written_as_text_are_coerced():
    from medgym.rl.config import GRPOConfigMedgym, load_config

    cfg = load_config(GRPOConfigMedgym, None, ["--learning_rate", "3e-5"])  # YAML 1.1 reads 3e-5 as a string
    assert cfg.learning_rate == 3e-5
    with pytest.raises(ValueError, match="wrong type"):
        load_config(GRPOConfigMedgym, None, ["--max_steps", "many"])


def test_unknown_key_lists_valid_ones(tmp_path):
    from medgym.rl.config import SFTConfig, load_config

    path = tmp_path / "c.yaml"
    path.write_text("epoch: 2\n")
    with pytest.raises(ValueError, match="valid keys:.*epochs"):
        load_config(SFTConfig, path)


def test_grpo_args_fp32_on_cpu(tmp_path):
    import torch

    from medgym.rl.config import GRPOConfigMedgym

    args = GRPOConfigMedgym(output_dir=str(tmp_path)).trl_args()
    if not torch.cuda.is_available():
        assert args.bf16 is False
    assert args.max_tool_calling_iterations == 4 and args.report_to == []


def test_cli_help_lists_config_fields(capsys):
    from medgym.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "grpo", "--help"])
    out = capsys.readouterr().out
    assert "--max_completion_length" in out and "image tokens included" in out and "--resume" in out
