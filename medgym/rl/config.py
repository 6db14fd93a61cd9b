"""Training configs: TRL's ``SFTConfig`` and ``GRPOConfig`` with medgym's fields added.

Every ``transformers.TrainingArguments`` / TRL field keeps its name and meaning (schedule,
optimizer, ``gradient_accumulation_steps``, logging, ``save_steps``); medgym adds where the
cases come from and how the tools run (:class:`MedgymArguments`). ``medgym train sft
--config configs/sft_embedded.yaml --num_train_epochs 2`` parses them with ``trl.TrlParser``:
the YAML sets the values, ``--key value`` options override them, ``__post_init__`` refuses bad
combinations with a message that names the fix.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
import trl

from medgym.environments.case import STAGES
from medgym.environments.contract import DEFAULT_TOOL_MODE, check_tool_mode
from medgym.rl.policy_model import EMBEDDED_SIZES

SEGMENTERS = ("threshold", "medsam")
# Keys of medgym's earlier hand-written configs, and the TRL / transformers field that replaced each.
RENAMED = {"epochs": "num_train_epochs", "grad_accum": "per_device_train_batch_size"}


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class MedgymArguments:
    """What SFT and GRPO share beyond TRL: the cases, the tools, the starting checkpoint."""

    source: str = _help("Task source the cases come from (see `medgym generate --source`).", default="phantom")
    train_seeds: list[int] = _help(
        "Case seeds for training as FIRST COUNT (YAML: [first, count]); held-out evaluation uses eval_seeds.",
        default_factory=lambda: [1000, 64],
    )
    eval_seeds: list[int] = _help(
        "Held-out case seeds FIRST COUNT evaluated after training (count 0: none).", default_factory=lambda: [0, 0]
    )
    segmenter: str = _help(
        f"segment backend of the tools during training and eval: one of {', '.join(SEGMENTERS)}.", default="threshold"
    )
    tool_mode: str = _help(
        "predicted: no tool reads ground truth (what a deployed policy gets); oracle: tools read it (an upper bound).",
        default=DEFAULT_TOOL_MODE,
    )
    init_from: str | None = _help(
        "Start from this checkpoint folder (a run folder means its final/; 'embedded' is the shipped one).",
        default=None,
    )

    def check_medgym(self) -> None:
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
                f"train_seeds {self.train_seeds} overlap eval_seeds {self.eval_seeds}; "
                "move one range so held-out cases stay unseen"
            )
        if self.segmenter not in SEGMENTERS:
            raise ValueError(f"segmenter must be one of {', '.join(SEGMENTERS)}; got {self.segmenter!r}")
        check_tool_mode(self.tool_mode)

    def apply_medgym_defaults(self) -> None:
        """``save_steps: 0`` means no checkpoints (only the final model); a CPU run is fp32 and gloo-distributed."""
        if self.save_steps < 0:
            raise ValueError("save_steps must be >= 0 (0 saves only the final model)")
        if self.save_steps == 0:
            self.save_strategy = "no"
            self.save_steps = 500  # unused with save_strategy 'no'; TrainingArguments wants a positive value
        if self.bf16 is None:  # TRL's default is bf16 everywhere; on a CPU bf16 is 4-5x slower than fp32
            self.bf16 = torch.cuda.is_available()
        if not torch.cuda.is_available():
            self.use_cpu = True  # without it, `accelerate launch` on CPUs gives every process world size 1
            self.dataloader_pin_memory = False


@dataclass
class SFTConfig(MedgymArguments, trl.SFTConfig):
    """SFT cold start on expert conversations (:class:`medgym.rl.sft.SharedPrefixSFTTrainer`).

    ``per_device_train_batch_size`` conversations form one group: its shared system text and
    tool list run once, and its loss is the mean over the group.
    """

    output_dir: str = _help("Folder for checkpoints, the final model, metrics.jsonl/csv and plots.", default="runs/sft")
    seed: int = _help("Seed of model init, data order and sampling.", default=0)
    num_train_epochs: float = _help("Passes over the training cases.", default=1.0)
    learning_rate: float = _help("Peak AdamW learning rate.", default=1e-3)
    per_device_train_batch_size: int = _help(
        "Conversations per group: they share one forward over the common system text and tool list.", default=4
    )
    lr_scheduler_type: str = _help("Learning-rate schedule after warmup.", default="cosine")
    warmup_steps: float = _help("Warmup steps (below 1: a share of all steps).", default=0.05)
    logging_steps: float = _help("Log loss and learning rate every N optimizer steps.", default=1)
    save_steps: float = _help(
        "Write a resumable checkpoint every N optimizer steps (0: only the final model).", default=50
    )
    activation_checkpointing: bool | None = _help(
        "Must stay off: the shared prefix's keys and values are reused through the KV cache.", default=False
    )
    gradient_checkpointing: bool | None = _help("Deprecated name of activation_checkpointing.", default=None)
    size: str = _help(
        f"Embedded model size when starting from scratch: one of {sorted(EMBEDDED_SIZES)}.", default="small"
    )
    tokenizer_cases: int = _help(
        "Phantom cases whose conversations train the tokenizer (fresh models only).", default=300
    )
    vocab_size: int = _help("Tokenizer vocabulary size (fresh models only).", default=8192)
    tools: bool = _help(
        "Train on expert tool conversations; false trains the no-tools baseline (answer straight away).", default=True
    )
    turns: int = _help(
        "Keep each expert conversation up to its first N assistant turns (0: whole). 1 trains the first move "
        "alone -- where to look (the box of the first segment or zoom) -- on short sequences.",
        default=0,
    )
    answer_weight: float = _help(
        "Weight of the answer turn's tokens in the loss against the calls' (1: all alike). The answer is a few "
        "tokens of each conversation; weighing it up teaches copying a number from a tool result into it.",
        default=1.0,
    )
    counterfactual_answers: float = _help(
        "Share of conversations whose numeric answer, printed once by a tool, is swapped for a random number "
        "in both places (medgym.rl.conversation.counterfactual_answer): only copying from the result answers it.",
        default=0.0,
    )
    templates: list[str] = _help(
        "Train on these phantom question templates only (empty: all), e.g. the four copied measurements "
        "longest_diameter, lesion_area, lesion_volume, mean_attenuation.",
        default_factory=list,
    )
    brief_tools: bool = _help(
        "Render the tool list without its prose (contract.tool_schemas(brief=True)): ~410 tokens before each "
        "conversation instead of ~1,350. The checkpoint records the schemas it was trained with, and its "
        "backend, evaluations and GRPO prompt it with them.",
        default=False,
    )
    keep_conversations: bool = _help(
        "Keep every built expert conversation in memory (~0.2 MB each), so later epochs skip the tools; with "
        "counterfactual_answers, each epoch swaps fresh numbers.",
        default=False,
    )
    expert_candidate_iou: float | None = _help(
        "How tightly a detect candidate must fit the lesion for the expert to segment it by number (IoU); "
        "unset: the expert's own rule (0.65). 0.2 names nearly every listed lesion by number.",
        default=None,
    )

    def __post_init__(self) -> None:
        self.check_medgym()
        if self.answer_weight <= 0:
            raise ValueError(f"answer_weight must be positive; got {self.answer_weight}")
        if not 0 <= self.counterfactual_answers <= 1:
            raise ValueError(f"counterfactual_answers must be within [0, 1]; got {self.counterfactual_answers}")
        if self.templates:
            from medgym.environments.templates import select_templates

            select_templates(self.templates)  # unknown names raise here, before any training
            if self.source != "phantom":
                raise ValueError(f"templates are phantom question templates; source is {self.source!r}")
        if self.expert_candidate_iou is not None and not 0 < self.expert_candidate_iou <= 1:
            raise ValueError(f"expert_candidate_iou must be in (0, 1]; got {self.expert_candidate_iou}")
        if self.size not in EMBEDDED_SIZES:
            raise ValueError(f"size must be one of {sorted(EMBEDDED_SIZES)}; got {self.size!r}")
        if self.tokenizer_cases <= 0 or self.vocab_size < 512:
            raise ValueError("tokenizer_cases must be positive and vocab_size at least 512")
        if self.activation_checkpointing or self.gradient_checkpointing:
            raise ValueError(
                "activation_checkpointing must be false: the shared-prefix loss reuses the prefix's KV cache, "
                "which checkpointed layers drop; lower per_device_train_batch_size to save memory instead"
            )
        if self.packing or self.padding_free:
            raise ValueError(
                "packing and padding_free must be false: each conversation keeps its own images and positions"
            )
        if self.learning_rate <= 0 or (self.num_train_epochs <= 0 and self.max_steps <= 0):
            raise ValueError("learning_rate and num_train_epochs (or max_steps) must be positive")
        if self.turns < 0 or (self.turns and not self.tools):
            raise ValueError("turns must be 0 (whole conversations) or positive, and needs tools: true")
        self.apply_medgym_defaults()
        super().__post_init__()


@dataclass
class GRPOConfig(MedgymArguments, trl.GRPOConfig):
    """GRPO with TRL's ``GRPOTrainer(environment_factory=...)`` on the medgym tools (:mod:`medgym.rl.grpo`)."""

    output_dir: str = _help(
        "Folder for checkpoints, the final model, metrics.jsonl/csv and plots.", default="runs/grpo"
    )
    seed: int = _help("Seed of data order and sampling.", default=0)
    init_from: str | None = _help(
        "Checkpoint to start from (an SFT model; 'embedded' is the shipped one).", default="embedded"
    )
    max_steps: int = _help("Optimizer steps.", default=20)
    learning_rate: float = _help(
        "AdamW learning rate. Too high and the policy stops calling tools (watch tools/call_frequency).", default=5e-6
    )
    per_device_train_batch_size: int = _help(
        "Completions per device per step (a multiple of num_generations).", default=4
    )
    num_generations: int | None = _help("Rollouts per prompt (the GRPO group size).", default=4)
    max_completion_length: int | None = _help(
        "Token budget of a whole rollout: generated text *and* tool results (image tokens included). A tool "
        "result that would cross it is dropped and the rollout ends on its call, unanswered (logged as "
        "rollouts/cut_by_budget): a looked-up rule question takes 370-480 tokens for the embedded policy.",
        default=1024,
    )
    max_tool_calling_iterations: int | None = _help("Tool rounds per rollout before it must answer.", default=4)
    beta: float = _help(
        "KL coefficient against the starting model (0 disables the reference model and KL).", default=0.02
    )
    logging_steps: float = _help("Log metrics every N steps.", default=1)
    activation_checkpointing: bool | None = _help(
        "Recompute activations in the backward pass to save memory (large models; the embedded policy needs no such thing).",
        default=False,
    )
    gradient_checkpointing: bool | None = _help("Deprecated name of activation_checkpointing.", default=None)
    save_steps: float = _help(
        "Write a resumable checkpoint every N optimizer steps (0: only the final model).", default=50
    )
    stages: list[str] = _help(
        "Draw training cases from these stages only (empty: all four), e.g. measurement.", default_factory=list
    )
    attn_implementation: str = _help(
        "Attention kernel of the policy during GRPO: sdpa (2.5-5x faster than eager on whole rollouts) or eager.",
        default="sdpa",
    )
    curve_every: int = _help(
        "Evaluate the live policy on the held-out curve_seeds every N steps and before the first (0: never).",
        default=0,
    )
    curve_seeds: list[int] = _help(
        "Held-out cases of the learning curve as FIRST COUNT (disjoint from train_seeds).",
        default_factory=lambda: [0, 100],
    )
    collapse_floor: float = _help(
        "Stop training when tools/call_frequency stays below this for collapse_patience logged steps (0: off).",
        default=0.0,
    )
    collapse_patience: int = _help(
        "Logged steps in a row below collapse_floor (or above failure_ceiling) before stopping.", default=3
    )
    failure_ceiling: float = _help(
        "Stop training when tools/failed_share (the share of the step's tool calls that failed) stays above "
        "this for collapse_patience logged steps (0: off).",
        default=0.0,
    )
    constrained: bool = _help(
        "Decode every rollout turn under the turn grammar (a tool call matching the tool schemas, or an "
        "answer in the env's format), so every turn parses (xgrammar; transformers generation only).",
        default=False,
    )
    shared_prefix: bool = _help(
        "Run the rollouts' common system text and tool list once per log-prob pass and reuse its KV cache "
        "(Qwen3-VL policies; others fall back to TRL's batched forward).",
        default=True,
    )
    loss_on: str = _help(
        "Rollout tokens the policy loss covers: 'all' (every token the model wrote; TRL's default) or "
        "'answer' (only what the answer says: the tokens after the last tool result and the last <answer> "
        "tag; the calls, and the choice to answer rather than call, get no gradient, so a noisy answer "
        "reward cannot push them around).",
        default="all",
    )
    advantage_floor: float | None = _help(
        "Clamp each rollout's advantage from below (0: only rollouts that beat their group's mean are "
        "reinforced and none is pushed down, a filtered self-imitation that a small policy whose rewards "
        "are mostly 0 survives; None: TRL's two-sided advantages).",
        default=None,
    )
    answer_evidence: str = _help(
        "What the answer turn reads: 'rollout' (the policy's own tool calls, run through the env: TRL's "
        "multi-turn loop) or 'expert' (the annotator expert's calls and the real tools' results, built per "
        "case, end the prompt and each rollout is the answer turn alone: GRPO on what the answer says, many "
        "more answers a second, the calls not trained, with max_tool_calling_iterations 0; needs collapse_floor 0) "
        "or 'policy' (as 'expert', but the prompt is the live policy's own greedy episode up to its answer, "
        "with its own calls and their real results, as it meets them when evaluated; the expert's where the "
        "policy's episode ends without an answer). With max_tool_calling_iterations > 0 the rollout of an "
        "'expert' or 'policy' prompt is that episode's last turn continued: it may call tools (their state, "
        "masks and detect's candidates, as the prompt's calls left it) before it answers, so the choice to "
        "answer or to look further is trained too (loss_on: all).",
        default="rollout",
    )
    tool_failure_weight: float = _help(
        "Weight of a GRPO-only reward term: minus the share of a rollout's tool calls that failed "
        "(bad arguments, unknown masks). 0: off. Logged as rewards/tool_failure.",
        default=0.0,
    )

    def __post_init__(self) -> None:
        self.check_medgym()
        if self.loss_on not in ("all", "answer"):
            raise ValueError(f"loss_on must be 'all' or 'answer', not {self.loss_on!r}")
        if self.answer_evidence not in ("rollout", "expert", "policy"):
            raise ValueError(f"answer_evidence must be 'rollout', 'expert' or 'policy', not {self.answer_evidence!r}")
        if self.answer_evidence != "rollout" and self.collapse_floor:
            raise ValueError(
                f"answer_evidence {self.answer_evidence!r} trains the end of an episode, where few rollouts call a "
                "tool: set collapse_floor: 0"
            )
        if self.tool_failure_weight < 0:
            raise ValueError("tool_failure_weight must be >= 0 (it weighs a penalty)")
        if self.max_steps <= 0 or self.learning_rate <= 0:
            raise ValueError("max_steps and learning_rate must be positive")
        if self.num_generations is None or self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: GRPO compares rollouts within a group")
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations}); e.g. set it to {self.num_generations * 2}"
            )
        if self.max_completion_length is None or self.max_completion_length < 32:
            raise ValueError("max_completion_length must be at least 32 tokens: tool results alone take ~20")
        if self.beta < 0:
            raise ValueError("beta must be >= 0")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages: unknown {unknown}; choose from {list(STAGES)}")
        if self.curve_every < 0 or self.collapse_floor < 0 or not 0 <= self.failure_ceiling <= 1:
            raise ValueError("curve_every and collapse_floor must be >= 0, failure_ceiling within [0, 1]")
        if self.curve_every:
            c0, cn = self.curve_seeds
            a0, an = self.train_seeds
            if cn <= 0 or (c0 < a0 + an and a0 < c0 + cn):
                raise ValueError(
                    f"curve_seeds {self.curve_seeds} must be [first, count>0] and not overlap train_seeds {self.train_seeds}"
                )
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be sdpa or eager; got {self.attn_implementation!r}")
        if self.use_vllm and not torch.cuda.is_available():
            raise ValueError("use_vllm needs a CUDA GPU; set use_vllm: false on CPU")
        self.apply_medgym_defaults()
        super().__post_init__()


def recipe(cfg: SFTConfig | GRPOConfig) -> dict[str, Any]:
    """The config's values that differ from its class defaults: what a checkpoint's ``medgym.json`` records.

    Call it before a trainer is built: making the default instance (a ``TrainingArguments``)
    resets accelerate's global state, which a running trainer relies on.
    """
    defaults = type(cfg)().to_dict()
    return {k: v for k, v in cfg.to_dict().items() if defaults.get(k) != v}
