"""What a SmolLM2-135M-sized text side would cost per SFT example on this machine.

Builds the shipped embedded policy's architecture twice -- as shipped ("small") and with the
text stack shaped like SmolLM2-135M (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536,
49,152-token vocabulary) -- with random weights (the cost does not depend on the values) and
times forward + backward on real expert conversations, full and with the shared-prefix loss
the SFT loop uses. Usage: python scripts/smollm2_cost.py [--n 4]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from medgym import EMBEDDED_POLICY_DIR
from medgym.environments.contract import tool_schemas
from medgym.environments.sources import PhantomSource
from medgym.rl.conversation import expert_conversation
from medgym.rl.policy_model import EMBEDDED_SIZES, build_model, load, n_parameters
from medgym.rl.sft import encode_conversation, shared_prefix_length, shared_prefix_loss

SMOLLM2 = {"hidden": 576, "layers": 30, "heads": 9, "kv": 3, "mlp": 1536}


def seconds_per_example(model, group, prefix: int, repeats: int = 2) -> float:
    model.train()
    shared_prefix_loss(model, group[:1], 0).backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.zero_grad()
        shared_prefix_loss(model, group, prefix).backward()
    return (time.perf_counter() - t0) / (repeats * len(group))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="conversations per timed group")
    args = parser.parse_args()
    _, processor = load(EMBEDDED_POLICY_DIR)
    source = PhantomSource()
    group = [
        encode_conversation(processor, expert_conversation(source.case(s))[0], tool_schemas())
        for s in range(30000, 30000 + args.n)
    ]
    prefix = shared_prefix_length(group, processor.tokenizer.convert_tokens_to_ids("<|im_start|>"))
    tokens = sum(g["input_ids"].shape[1] for g in group) / len(group)
    out = {"tokens_per_conversation": tokens, "shared_prefix": prefix, "threads": torch.get_num_threads()}
    EMBEDDED_SIZES["smollm2-shape"] = {**EMBEDDED_SIZES["small"], **SMOLLM2}
    for size in ("small", "smollm2-shape"):
        model = build_model(processor, size)
        if size != "small":  # SmolLM2's vocabulary, not the project's 8k one
            model.resize_token_embeddings(49152)
        out[size] = {
            "parameters": n_parameters(model),
            "s_per_example_full": round(seconds_per_example(model, group, 0), 3),
            "s_per_example_shared_prefix": round(seconds_per_example(model, group, prefix), 3),
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
