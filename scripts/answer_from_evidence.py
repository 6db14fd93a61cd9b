"""Can a policy answer from evidence it is handed? Its answer turn after the expert's own tool results.

For each held-out phantom case the expert's predicted-mode conversation runs up to its answer (the
expert's calls, real tool results, pictures included); the policy then writes the answer turn,
greedily. Reported per stage: the share scored right against the case's truth, and the share equal
to the expert's answer read off those same results (what copying from the evidence gives). A policy
that copies scores near the expert here whatever its own calls are like; one that answers with
typical values scores near the answer prior.

Usage: python scripts/answer_from_evidence.py CHECKPOINT [--n 60] [--seed 0] [--candidate-iou 0.2] [--templates T ...]
(CHECKPOINT: a folder written by ``medgym train`` or a shipped name such as ``embedded-sft``).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from medgym.agents.backends import checkpoint_meta
from medgym.environments.contract import tool_schemas
from medgym.environments.parsing import parse_action
from medgym.environments.rewards import score_answer
from medgym.environments.sources import PhantomSource
from medgym.rl.bridge import MedGymToolEnv
from medgym.rl.conversation import expert_conversation
from medgym.rl.policy_model import load
from medgym.rl.runs import resolve_checkpoint


def answer_turn(model, processor, messages: list[dict], tools: list[dict] | None) -> str:
    """The policy's greedy answer turn after ``messages`` (the expert's conversation minus its answer)."""
    enc = processor.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=False)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--candidate-iou", type=float, default=None)
    ap.add_argument("--templates", nargs="*", default=None, help="question templates only (default: all)")
    args = ap.parse_args(argv)
    folder = resolve_checkpoint(args.checkpoint)
    model, processor = load(folder)
    meta = checkpoint_meta(folder)
    tools = meta.get("tool_schemas") or tool_schemas()
    system = meta.get("system_prompt")
    env = MedGymToolEnv(segmenter="threshold", tool_mode="predicted")
    source = PhantomSource(templates=args.templates)
    right, copied, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for seed in range(args.seed, args.seed + args.n):
        case = source.case(seed)
        messages, _ = expert_conversation(case, env, "predicted", system=system, candidate_iou=args.candidate_iou)
        expert_text = messages[-1]["content"][0]["text"]
        text = answer_turn(model, processor, messages[:-1], tools)
        policy, expert = parse_action(text.split("<|im_end|>")[0]), parse_action(expert_text)
        stage = case.stage
        count[stage] += 1
        right[stage] += score_answer(
            policy.answer,
            policy.box,
            case.answer,
            case.answer_type,
            case.choices or (),
            case.tolerance,
            case.abs_tolerance,
            case.answer_box,
        )
        copied[stage] += float(policy.answer is not None and policy.answer == expert.answer)
    n = sum(count.values())
    report = {
        "checkpoint": str(folder),
        "n": n,
        "accuracy": round(sum(right.values()) / n, 3),
        "equals_expert": round(sum(copied.values()) / n, 3),
        "by_stage": {
            s: {
                "n": count[s],
                "accuracy": round(right[s] / count[s], 3),
                "equals_expert": round(copied[s] / count[s], 3),
            }
            for s in sorted(count)
        },
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
