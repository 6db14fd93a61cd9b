"""Configs: TRL config subclasses parsed by TrlParser (YAML + overrides), validation that names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_configs_are_trl_configs():
    import trl

    from medgym.rl.config import GRPOConfig, SFTConfig

    assert issubclass(SFTConfig, trl.SFTConfig) and issubclass(GRPOConfig, trl.GRPOConfig)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    from medgym.rl.commands import parse_config
    from medgym.rl.config import GRPOConfig, SFTConfig

    cls = GRPOConfig if path.name.startswith("grpo") else SFTConfig
    cfg, options = parse_config(cls, ["--config", str(path)])
    assert cfg.output_dir.startswith("runs/") and cfg.train_seeds[1] > 0 and not options.resume


def test_yaml_then_overrides():
    from medgym.rl.commands import parse_config
    from medgym.rl.config import GRPOConfig, SFTConfig

    sft, _ = parse_config(SFTConfig, ["--config", str(CONFIGS / "sft_embedded.yaml"), "--num_train_epochs", "2"])
    assert sft.size == "small" and sft.num_train_epochs == 2 and sft.per_device_train_batch_size == 2
    argv = ["--config", str(CONFIGS / "grpo_embedded.yaml"), "--max_steps", "3", "--train-seeds", "1000", "8"]
    grpo, options = parse_config(GRPOConfig, [*argv, "--resume", "--tool_mode", "oracle"])
    assert grpo.max_steps == 3 and grpo.train_seeds == [1000, 8] and grpo.stages == []
    assert grpo.constrained and grpo.shared_prefix and grpo.beta == 0.0 and grpo.curve_seeds == [0, 100]
    assert grpo.reward_weights == [1.0, 0.5, 0.1, 0.2, 1.0]
    assert grpo.tool_mode == "oracle" and options.resume
    default, _ = parse_config(GRPOConfig, [])
    assert default.tool_mode == "predicted"


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        ("SFTConfig", {"size": "huge"}, "size must be one of"),
        ("SFTConfig", {"train_seeds": [0, 10], "eval_seeds": [5, 10]}, "overlap"),
        ("SFTConfig", {"train_seeds": [0]}, r"\[first_seed, count\]"),
        ("SFTConfig", {"activation_checkpointing": True}, "KV cache"),
        ("SFTConfig", {"tool_mode": "psychic"}, "choose 'predicted'"),
        ("GRPOConfig", {"per_device_train_batch_size": 6, "num_generations": 4}, "multiple of"),
        ("GRPOConfig", {"num_generations": 1, "per_device_train_batch_size": 1}, "num_generations must be >= 2"),
        ("GRPOConfig", {"stages": ["astrology"]}, "choose from"),
        ("GRPOConfig", {"segmenter": "crayon"}, "segmenter must be one of"),
        ("GRPOConfig", {"loss_on": "calls"}, "loss_on must be 'all' or 'answer'"),
        ("SFTConfig", {"turns": 1, "tools": False}, "needs tools: true"),
        ("SFTConfig", {"turns": -1}, "turns must be 0"),
    ],
)
def test_bad_values_are_refused_with_a_fix(cls, values, message):
    from medgym.rl import config

    with pytest.raises(ValueError, match=message):
        getattr(config, cls)(**values)


def test_yaml_numbers_written_as_text_are_numbers(tmp_path):
    from medgym.rl.commands import parse_config
    from medgym.rl.config import GRPOConfig

    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3e-5\n")  # YAML 1.1 reads 3e-5 as a string
    cfg, _ = parse_config(GRPOConfig, ["--config", str(path)])
    assert cfg.learning_rate == 3e-5
    with pytest.raises(SystemExit):  # argparse: invalid int value
        parse_config(GRPOConfig, ["--max_steps", "many"])


def test_old_keys_name_their_new_names(tmp_path):
    from medgym.rl.commands import parse_config
    from medgym.rl.config import SFTConfig

    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\ngrad_accum: 4\n")
    with pytest.raises(ValueError, match="`epochs` is now `num_train_epochs`.*`grad_accum` is now"):
        parse_config(SFTConfig, ["--config", str(path)])


def test_save_steps_zero_means_no_checkpoints_and_cpu_is_fp32(tmp_path):
    import torch

    from medgym.rl.config import GRPOConfig, SFTConfig

    args = GRPOConfig(output_dir=str(tmp_path), save_steps=0)
    assert args.save_strategy == "no"
    if not torch.cuda.is_available():
        assert args.bf16 is False and SFTConfig().bf16 is False
    assert args.max_tool_calling_iterations == 4 and args.report_to == []


def test_recipe_keeps_only_what_differs_from_the_defaults():
    from medgym.rl.config import SFTConfig, recipe

    assert recipe(SFTConfig(num_train_epochs=3, train_seeds=[5, 5])) == {"num_train_epochs": 3, "train_seeds": [5, 5]}


def test_cli_help_lists_config_fields(capsys):
    from medgym.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "grpo", "--help"])
    out = capsys.readouterr().out
    assert "--max_completion_length" in out and "image tokens included" in out and "--resume" in out
    assert "--tool_mode" in out and "--num_generations" in out
