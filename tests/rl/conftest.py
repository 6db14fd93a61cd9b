"""A tiny embedded policy trained once per session: tokenizer, random Qwen3-VL, a short SFT."""

from __future__ import annotations

import pytest

# Cases without retrieve calls keep the session from building the knowledge-base index.
NO_RETRIEVE_STAGES = ["recognition", "measurement", "visual_reasoning"]
SFT_SEEDS = range(2000, 2032)


@pytest.fixture(scope="session")
def tiny_source():
    from medgym.environments.sources import PhantomSource

    return PhantomSource(stages=NO_RETRIEVE_STAGES)


@pytest.fixture(scope="session")
def tiny_processor(tiny_source):
    from medgym.rl.policy_model import build_processor

    return build_processor(n_cases=12, vocab_size=2048, source=tiny_source)


@pytest.fixture(scope="session")
def tiny_sft(tiny_processor, tiny_source, tmp_path_factory):
    """(folder, cases): a tiny model after a short SFT on 32 expert conversations, saved to a folder."""
    from medgym.rl.policy_model import build_model, save
    from medgym.rl.sft import train_sft

    model = build_model(tiny_processor, "tiny", seed=0)
    cases = [tiny_source.case(s) for s in SFT_SEEDS]
    losses: list[float] = []
    train_sft(
        model,
        tiny_processor,
        cases,
        epochs=10,
        learning_rate=5e-3,
        grad_accum=1,
        log_fn=lambda row: losses.append(row["loss"]),
    )
    folder = save(model, tiny_processor, tmp_path_factory.mktemp("tiny") / "sft", {"model_id": "tiny-sft"})
    return folder, cases, losses
