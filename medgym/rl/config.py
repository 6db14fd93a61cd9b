"""Training configs: dataclasses with help on every field, loaded from YAML, overridden from the CLI.

``medgym train sft --config configs/sft_embedded.yaml --epochs 2`` reads the YAML into
:class:`SFTConfig`, applies ``--key value`` overrides (parsed as YAML scalars) and validates
the result in ``__post_init__`` with messages that name the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from medgym.environments.case import STAGES
from medgym.rl.policy_model import EMBEDDED_SIZES


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class CommonConfig:
    output_dir: str = _help("Folder for checkpoints, the final model, metrics.jsonl/csv and plots.", default="runs/sft")
    seed: int = _help("Seed of model init, data order and sampling.", default=0)
    source: str = _help("Task source the cases come from (see `medgym generate --source`).", default="phantom")
    train_seeds: list[int] = _help(
        "Case seeds for training as [first, count]; held-out evaluation uses eval_seeds.",
        default_factory=lambda: [1000, 64],
    )
    eval_seeds: list[int] = _help(
        "Held-out case seeds [first, count] evaluated after training (count 0: none).", default_factory=lambda: [0, 0]
    )
    save_steps: int = _help(
        "Write a resumable checkpoint every N optimizer steps (0: only the final model).", default=50
    )
    segmenter: str = _help(
        "segment backend used by the tools during training and eval: threshold or medsam.", default="threshold"
    )

    def __post_init__(self) -> None:
        for name in ("train_seeds", "eval_seeds"):
            value = getattr(self, name)
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)):
                raise ValueError(f"{name} must be [first_seed, count], e.g. [1000, 64]; got {value!r}")
            if value[1] < 0:
                raise ValueError(f"{name}: the count must be >= 0, got {value[1]}")
        if self.train_seeds[1] == 0:
            raise ValueError("train_seeds count must be positive: there is nothing to train on")
        a0, an = self.train_seeds
        b0, bn = self.eval_seeds
        if bn and a0 < b0 + bn and b0 < a0 + an:
            raise ValueError(
                f"train_seeds {self.train_seeds} overlap eval_seeds {self.eval_seeds}; move one range so held-out cases stay unseen"
            )
        if self.save_steps < 0:
            raise ValueError("save_steps must be >= 0 (0 saves only the final model)")
        if self.segmenter not in ("threshold", "medsam"):
            raise ValueError("segmenter must be 'threshold' or 'medsam'")


@dataclass
class SFTConfig(CommonConfig):
    size: str = _help(
        f"Embedded model size when starting from scratch: one of {sorted(EMBEDDED_SIZES)}.", default="small"
    )
    init_from: str | None = _help("Start from this checkpoint folder instead of a fresh random model.", default=None)
    tokenizer_cases: int = _help(
        "Phantom cases whose conversations train the tokenizer (fresh models only).", default=300
    )
    vocab_size: int = _help("Upper bound of the BPE vocabulary.", default=8192)
    epochs: float = _help("Passes over the expert conversations.", default=3.0)
    learning_rate: float = _help("Peak AdamW learning rate (cosine decay, short warmup).", default=1e-3)
    grad_accum: int = _help("Conversations per optimizer step (batch 1, accumulated).", default=4)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    tools: bool = _help(
        "Train on expert tool conversations (true) or on direct answers from the image: the no-tools baseline.",
        default=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size not in EMBEDDED_SIZES:
            raise ValueError(f"size must be one of {sorted(EMBEDDED_SIZES)}, got {self.size!r}")
        if self.epochs <= 0 or self.learning_rate <= 0 or self.grad_accum <= 0:
            raise ValueError("epochs, learning_rate and grad_accum must be positive")
        if self.tokenizer_cases <= 0 or self.vocab_size < 512:
            raise ValueError("tokenizer_cases must be positive and vocab_size at least 512")


@dataclass
class GRPOConfigMedgym(CommonConfig):
    output_dir: str = _help(
        "Folder for checkpoints, the final model, metrics.jsonl/csv and plots.", default="runs/grpo"
    )
    init_from: str = _help(
        "Checkpoint to start from (an SFT model; 'embedded' is the shipped one).", default="embedded"
    )
    max_steps: int = _help("Optimizer steps.", default=20)
    learning_rate: float = _help(
        "AdamW learning rate. Too high and the policy stops calling tools (watch tools/call_frequency).", default=5e-6
    )
    per_device_train_batch_size: int = _help(
        "Completions per device per step (a multiple of num_generations).", default=4
    )
    num_generations: int = _help("Rollouts per prompt (the GRPO group size).", default=4)
    max_completion_length: int = _help(
        "Token budget of a whole rollout: generated text *and* tool results (image tokens included).", default=256
    )
    max_tool_calling_iterations: int = _help("Tool rounds per rollout before it must answer.", default=4)
    temperature: float = _help("Sampling temperature of rollouts.", default=1.0)
    beta: float = _help(
        "KL coefficient against the starting model (0 disables the reference model and KL).", default=0.02
    )
    stages: list[str] = _help(
        "Draw training cases from these stages only (empty: all four), e.g. [measurement].", default_factory=list
    )
    logging_steps: int = _help("Log metrics every N steps.", default=1)
    bf16: bool | None = _help(
        "bf16 training; default: on with a CUDA GPU, off on CPU (bf16 is 4-5x slower there).", default=None
    )
    use_vllm: bool = _help("Generate with vLLM (GPU only); forwarded to TRL's GRPOConfig.", default=False)
    vllm_mode: str = _help("vLLM mode, 'colocate' or 'server' (forwarded).", default="colocate")
    vllm_gpu_memory_utilization: float = _help("vLLM GPU memory share in colocate mode (forwarded).", default=0.3)
    vllm_server_base_url: str | None = _help(
        "URL of a `trl vllm-serve` server in server mode (forwarded).", default=None
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_steps <= 0 or self.learning_rate <= 0:
            raise ValueError("max_steps and learning_rate must be positive")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: GRPO compares rollouts within a group")
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations}); e.g. set it to {self.num_generations * 2}"
            )
        if self.max_completion_length < 32:
            raise ValueError("max_completion_length must be at least 32 tokens: tool results alone take ~20")
        if self.vllm_mode not in ("colocate", "server"):
            raise ValueError("vllm_mode must be 'colocate' or 'server'")
        if self.beta < 0:
            raise ValueError("beta must be >= 0")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown {unknown}; choose from {list(STAGES)}")
        if self.use_vllm:
            import torch

            if not torch.cuda.is_available():
                raise ValueError("use_vllm needs a CUDA GPU; set use_vllm: false on CPU")

    def trl_args(self, **extra: Any):
        """TRL's GRPOConfig from this config (fp32 on CPU unless bf16 is set explicitly)."""
        import torch
        from trl import GRPOConfig

        bf16 = self.bf16 if self.bf16 is not None else torch.cuda.is_available()
        vllm: dict[str, Any] = {}
        if self.use_vllm:
            vllm = {
                "use_vllm": True,
                "vllm_mode": self.vllm_mode,
                "vllm_gpu_memory_utilization": self.vllm_gpu_memory_utilization,
            }
            if self.vllm_server_base_url:
                vllm["vllm_server_base_url"] = self.vllm_server_base_url
        kwargs: dict[str, Any] = dict(
            output_dir=self.output_dir,
            seed=self.seed,
            max_steps=self.max_steps,
            learning_rate=self.learning_rate,
            per_device_train_batch_size=self.per_device_train_batch_size,
            num_generations=self.num_generations,
            max_completion_length=self.max_completion_length,
            max_tool_calling_iterations=self.max_tool_calling_iterations,
            temperature=self.temperature,
            beta=self.beta,
            logging_steps=self.logging_steps,
            save_steps=self.save_steps if self.save_steps else self.max_steps + 1,
            save_strategy="steps" if self.save_steps else "no",
            bf16=bf16,
            fp16=False,
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0,
            disable_tqdm=False,
            **vllm,
        )
        kwargs.update(extra)
        return GRPOConfig(**kwargs)


def field_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def load_config(cls: type, path: str | Path | None, overrides: list[str] | None = None):
    """A config from YAML plus ``--key value`` overrides; unknown keys are an error naming the valid ones."""
    values: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping of field: value")
        values.update(data)
    values.update(parse_overrides(overrides or []))
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys: {', '.join(sorted(names))}")
    types = {f.name: str(f.type) for f in fields(cls)}
    values = {k: _coerce(types[k], v) for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as exc:  # a value of the wrong kind (e.g. text where a number belongs)
        raise ValueError(f"a config value has the wrong type ({exc}); check the YAML values") from None


def _coerce(annotation: str, value: Any) -> Any:
    """YAML 1.1 reads ``3e-5`` as text; numbers given as text become numbers where the field wants one."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        if kind.__name__ in annotation.replace("list[int]", ""):
            try:
                return kind(value)
            except ValueError:
                continue
    return value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["--lr", "1e-3", "--epochs=2"]`` -> ``{"lr": 0.001, "epochs": 2}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise ValueError(f"override {item!r} must look like --key value or --key=value")
        key = item[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
        else:
            if i + 1 >= len(items):
                raise ValueError(f"override --{key} needs a value")
            raw = items[i + 1]
            i += 1
        out[key.replace("-", "_")] = yaml.safe_load(raw)
        i += 1
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
