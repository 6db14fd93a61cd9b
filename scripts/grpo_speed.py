"""Seconds per GRPO step of the embedded policy: today's settings against the faster ones, in one run.

Each variant builds TRL's trainer on the same cases (measurement questions, predicted-mode tools,
8 rollouts per step: 2 prompts x 4 generations) from the same checkpoint, runs ``--steps`` steps
and reports the median step time after the first (warm-up), the rollout (generation + tools) and
tool seconds, and the tool share of rollout time. Variants:

- ``baseline``: eager attention, TRL's batched log-prob forward, reference model (beta 0.02);
- ``sdpa``: SDPA attention, otherwise as baseline;
- ``shared``: SDPA and the shared-prefix log-prob pass (beta 0.02);
- ``fast``: SDPA, shared prefix, beta 0 (no reference model), constrained decoding of rollouts.

Usage: OMP_NUM_THREADS=1 python scripts/grpo_speed.py [--steps 3] [--variants baseline,fast] [--init embedded]
Prints one JSON object; step-time ratios are against the first variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from transformers import TrainerCallback

VARIANTS = {
    "baseline": {"attn_implementation": "eager", "shared_prefix": False, "beta": 0.02},
    "sdpa": {"attn_implementation": "sdpa", "shared_prefix": False, "beta": 0.02},
    "shared": {"attn_implementation": "sdpa", "shared_prefix": True, "beta": 0.02},
    "fast": {"attn_implementation": "sdpa", "shared_prefix": True, "beta": 0.0, "constrained": True},
}


class StepTimes(TrainerCallback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.started = 0.0
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "timing/rollout_seconds" in logs:
            self.logs.append(dict(logs))

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def run_variant(name: str, steps: int, init: str, first_seed: int) -> dict:
    from medgym.rl.config import GRPOConfig
    from medgym.rl.grpo import build_dataset, make_trainer
    from medgym.rl.policy_model import load
    from medgym.rl.runs import resolve_checkpoint

    settings = dict(VARIANTS[name])
    with tempfile.TemporaryDirectory() as out:
        known = {f for f in GRPOConfig.__dataclass_fields__}
        cfg = GRPOConfig(
            output_dir=out,
            train_seeds=[first_seed, 2 * steps],
            max_steps=steps,
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=256,
            max_tool_calling_iterations=4,
            learning_rate=5e-5,
            temperature=1.0,
            save_steps=0,
            stages=["measurement"],
            tool_mode="predicted",
            seed=0,
            disable_tqdm=True,
            report_to=[],
            **{k: v for k, v in settings.items() if k in known},
        )
        model, processor = load(resolve_checkpoint(init), cfg.attn_implementation)
        model.train()
        dataset = build_dataset(list(range(first_seed, first_seed + 2 * steps)), "phantom", cfg.stages, cfg.tool_mode)
        timer = StepTimes()
        trainer = make_trainer(model, processor, dataset, cfg, [timer])
        trainer.train()
        rollout = [float(r["timing/rollout_seconds"]) for r in timer.logs]
        tools = [float(r["timing/tool_seconds"]) for r in timer.logs]
        lengths = [float(r.get("completions/mean_length", 0)) for r in timer.logs]
        return {
            "settings": settings,
            "step_seconds": [round(s, 2) for s in timer.seconds],
            "median_step_seconds": round(statistics.median(timer.seconds[1:] or timer.seconds), 2),
            "rollout_seconds": round(sum(rollout) / max(len(rollout), 1), 2),
            "tool_seconds": round(sum(tools) / max(len(tools), 1), 3),
            "tool_share_of_rollout": round(sum(tools) / sum(rollout), 4) if sum(rollout) else None,
            "mean_completion_tokens": round(statistics.mean(lengths or [0]), 1),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variants", default="baseline,fast")
    p.add_argument("--init", default="embedded", help="checkpoint to start from")
    p.add_argument("--first-seed", type=int, default=61000)
    args = p.parse_args()
    results = {}
    for name in args.variants.split(","):
        results[name] = run_variant(name, args.steps, args.init, args.first_seed)
        print(json.dumps({name: results[name]}), flush=True)
    base = next(iter(results.values()))["median_step_seconds"]
    for r in results.values():
        r["speedup_vs_first"] = round(base / r["median_step_seconds"], 2)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
