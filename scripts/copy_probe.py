"""Can the policy's architecture learn to copy a number from a tool result into its answer?

Trains a copy of a checkpoint on synthetic turns -- a measurement question, a ``measure`` call, a
result printing four random values (longest diameter, short axis, area, mean), the answer that
copies the asked one -- with the loss on the answer only, and reports the share of held-out turns
answered exactly every ``--every`` steps. ``--system`` puts the checkpoint's real system text and
tool list (about 1,350 tokens, whose schema text names the same quantities) before every turn, run
once per batch with the shared-prefix loss, as in SFT. Nothing is saved unless ``--out`` is given.

With ``--out``, the trained copy is saved as a checkpoint (its ``medgym.json`` the start's), so SFT can
continue from it (``init_from``).

Usage: python scripts/copy_probe.py runs/sft_embedded_detect/final [--system] [--steps 600] [--batch 16] [--out DIR]
Prints one JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from medgym.agents.backends import checkpoint_meta
from medgym.environments.contract import tool_schemas
from medgym.rl.conversation import system_message
from medgym.rl.policy_model import load, save
from medgym.rl.runs import resolve_checkpoint
from medgym.rl.sft import shared_prefix_loss

FIELDS = [
    ("longest diameter", "mm", "What is the longest diameter of the lesion?"),
    ("short axis", "mm", "What is the short axis of the lesion?"),
    ("area", "mm2", "What is the lesion's area?"),
    ("mean", "HU", "What is the mean attenuation of the lesion?"),
]


def turn(rng: random.Random) -> tuple[str, str, str]:
    """(prompt text from the user turn on, answer text, the value asked for)."""
    values = {f: f"{(rng.uniform(-120, 400) if rng.random() < 0.3 else rng.uniform(2, 60)):.1f}" for f, _, _ in FIELDS}
    field, _, question = rng.choice(FIELDS)
    result = ", ".join(f"{f} {values[f]} {unit}" for f, unit, _ in FIELDS)
    call = '{"name": "measure", "arguments": {"target": "mask_1"}}'
    prompt = (
        f"<|im_start|>user\n{question}\nAnswer with a number.<|im_end|>\n<|im_start|>assistant\n"
        f"<tool_call>{call}</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n"
        f"[measure] mask_1: {result}; 1 component(s).\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    return prompt, f"<answer>{values[field]}</answer><|im_end|>", values[field]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--system", action="store_true", help="the real system text and tool list before every turn")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--held-out", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    folder = resolve_checkpoint(args.checkpoint)
    model, processor = load(folder)
    tok = processor.tokenizer
    meta = checkpoint_meta(folder)
    prefix = ""
    if args.system:
        system = meta.get("system_prompt") or system_message("predicted")
        probe = [
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "text", "text": "x"}]},
        ]
        rendered = processor.apply_chat_template(
            probe, tools=meta.get("tool_schemas") or tool_schemas(), tokenize=False
        )
        prefix = rendered[: rendered.rindex("<|im_start|>user")]
    prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    rng, held = random.Random(0), [turn(random.Random(10_000 + i)) for i in range(args.held_out)]

    def example() -> dict[str, torch.Tensor]:
        prompt, answer, _ = turn(rng)
        p, a = tok(prompt, add_special_tokens=False)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prefix_ids + p + a])
        return {
            "input_ids": ids,
            "mm_token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([[-100] * (len(prefix_ids) + len(p)) + a]),
        }

    def exact() -> float:
        model.eval()
        hits = 0
        with torch.no_grad():
            for prompt, _, value in held:
                x = torch.tensor([prefix_ids + tok(prompt, add_special_tokens=False)["input_ids"]])
                out = model.generate(input_ids=x, max_new_tokens=12, do_sample=False)
                hits += f"<answer>{value}</answer>" in tok.decode(out[0, x.shape[1] :])
        model.train()
        return hits / len(held)

    report = {"checkpoint": str(folder), "system_prefix_tokens": len(prefix_ids), "batch": args.batch}
    print(json.dumps({**report, "step": 0, "exact": exact()}), flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    start = time.time()
    for step in range(1, args.steps + 1):
        loss = shared_prefix_loss(model, [example() for _ in range(args.batch)], len(prefix_ids))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % args.every == 0 or step == args.steps:
            row = {"step": step, "loss": round(loss.item(), 3), "exact": exact(), "seconds": round(time.time() - start)}
            print(json.dumps({**report, **row}), flush=True)
    if args.out:  # a checkpoint like any other: its medgym.json keeps the start's system text and tool list
        save(model, processor, args.out, {**meta, "model_id": f"{meta.get('model_id', 'embedded')}-copy-probe"})


if __name__ == "__main__":
    main()
