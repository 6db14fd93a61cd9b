"""Seconds of one SFT step and one GRPO step per zoo architecture and size, a tool image in every step.

SFT: :class:`medgym.rl.sft.SharedPrefixSFTTrainer` on one expert conversation per step (phantom case
25, predicted mode: the expert zooms, then answers; two pictures), encoded before the clock starts.
GRPO: :func:`medgym.rl.grpo.make_trainer` (TRL's ``GRPOTrainer(environment_factory=...)``), two
rollouts per step, ``max_completion_length`` 128, one tool round, beta 0; the first turn is scripted
(rollout 0 calls zoom, rollout 1 answers: random weights never call a tool), the turn after the crop
is sampled. A step is the Trainer's (``on_step_begin`` to ``on_step_end``: rollout, rewards, loss,
backward, optimizer); each figure is the median of ``--steps`` steps. Random weights, CPU, fp32.

Usage: OMP_NUM_THREADS=1 python scripts/zoo_train_steps.py [--sizes tiny small] [--archs qwen3_vl ...]
       [--steps 3] [--out /tmp/notes/train_steps_table.md]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from medgym.models import zoo
from medgym.rl.policy_model import n_parameters

ZOOM_SEED = 25  # phantom case whose predicted-mode expert calls zoom
ZOOM_CALL = '<tool_call>\n{"name": "zoom", "arguments": {"boxes": [[0, 0, 128, 128]]}}\n</tool_call>'


class StepClock(TrainerCallback):
    """Wall-clock seconds of every optimizer step."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def sft_seconds(arch: str, size: str, steps: int, out: Path) -> list[float]:
    from medgym.environments.sources import PhantomSource
    from medgym.rl.config import SFTConfig
    from medgym.rl.sft import ConversationDataset, SharedPrefixSFTTrainer

    model, processor = zoo.build(arch, size)
    dataset = ConversationDataset([PhantomSource().case(ZOOM_SEED)], processor)
    dataset[0]  # encode (tools, pictures, template) before the clock starts
    args = SFTConfig(
        output_dir=str(out / f"sft-{arch}-{size}"),
        max_steps=steps,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        save_steps=0,
        report_to="none",
        disable_tqdm=True,
        logging_steps=steps,
    )
    clock = StepClock()
    trainer = SharedPrefixSFTTrainer(
        model=model.train(), args=args, train_dataset=dataset, processing_class=processor, callbacks=[clock]
    )
    trainer.train()
    return clock.seconds


def grpo_seconds(arch: str, size: str, steps: int, out: Path) -> list[float]:
    from medgym.rl.config import GRPOConfig
    from medgym.rl.grpo import build_dataset, make_trainer, tool_turns

    def tool_turn_reward(completions, **kwargs):  # differs within the group: non-zero advantages
        return [float(tool_turns(c)) for c in completions]

    model, processor = zoo.build(arch, size)
    args = GRPOConfig(
        output_dir=str(out / f"grpo-{arch}-{size}"),
        train_seeds=[ZOOM_SEED, 1],
        max_steps=steps,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=128,
        max_tool_calling_iterations=1,
        beta=0.0,
        learning_rate=1e-3,
        save_steps=0,
        report_to="none",
        disable_tqdm=True,
        logging_steps=steps,
    )
    clock = StepClock()
    trainer = make_trainer(
        model.train(),
        processor,
        build_dataset([ZOOM_SEED]),
        args,
        callbacks=[clock],
        extra_rewards=[(tool_turn_reward, 1.0)],
    )
    sampled, tok = trainer._generate_single_turn, processor.tokenizer

    def first_turn_scripted(prompt_ids, images, fields, num_generations, has_tool_images=False):
        if num_generations == 1:  # the turn after a tool result: the model's own
            return sampled(prompt_ids, images, fields, num_generations, has_tool_images)
        end = trainer.eos_token_ids[0]
        texts = [ZOOM_CALL if i % 2 == 0 else "<answer>no</answer>" for i in range(len(prompt_ids))]
        return [tok.encode(t, add_special_tokens=False) + [end] for t in texts], None

    trainer._generate_single_turn = first_turn_scripted
    trainer.train()
    return clock.seconds


def measure(label: str, fn, *args) -> tuple[str, str]:
    """(median seconds, note): a failure is reported by its first line, not raised."""
    try:
        seconds = fn(*args)
    except Exception as exc:  # a gap in the loop is a result of this measurement
        logging.getLogger(__name__).exception("%s failed", label)
        return "fails", f"{label}: {type(exc).__name__}: {str(exc).split('. ')[0][:120]}"
    return f"{statistics.median(seconds):.2f}", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(zoo.ARCHS), choices=list(zoo.ARCHS))
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(zoo.TOKENIZER_SIZES))
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per trainer (median reported)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/notes/train_steps_table.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for arch in args.archs:
                params = n_parameters(zoo.build(arch, size)[0])
                sft, sft_note = measure("SFT", sft_seconds, arch, size, args.steps, Path(tmp))
                grpo, grpo_note = measure("GRPO", grpo_seconds, arch, size, args.steps, Path(tmp))
                note = "; ".join(n for n in (sft_note, grpo_note) if n)
                rows.append(f"| {arch} | {size} | {params:,} | {sft} | {grpo} | {note} |")
                print(rows[-1], flush=True)
    table = "\n".join(
        [
            f"Median of {args.steps} steps, seconds, CPU ({torch.get_num_threads()} torch thread(s)), fp32, random weights.",
            "",
            "| arch | size | parameters | SFT step (s) | GRPO step (s) | note |",
            "|---|---|---:|---:|---:|---|",
            *rows,
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
