"""A tiny embedded policy trained once per session: tokenizer, random Qwen3-VL, a short SFT.

The tiny policy trains and rolls out in oracle tool mode: its expert calls name structures
(``segment(structure="lesion")``), which a model this small learns in a minute, whereas
predicted mode's calls carry box coordinates read off the picture. The tests check the
training machinery, not perception.
"""

from __future__ import annotations

import pytest

# Cases without retrieve calls keep the session from building the knowledge-base index.
NO_RETRIEVE_STAGES = ["recognition", "measurement", "visual_reasoning"]
SFT_SEEDS = range(2000, 2032)
TINY_TOOL_MODE = "oracle"


@pytest.fixture(scope="session")
def tiny_tool_mode() -> str:
    return TINY_TOOL_MODE


@pytest.fixture(scope="session")
def tiny_source():
    from medgym.environments.sources import PhantomSource

    return PhantomSource(stages=NO_RETRIEVE_STAGES)


@pytest.fixture(scope="session")
def tiny_processor(tiny_source):
    from medgym.rl.policy_model import build_processor

    return build_processor(n_cases=12, vocab_size=2048, source=tiny_source)


@pytest.fixture(scope="session")
def tiny_init(tiny_processor, tmp_path_factory):
    """A folder holding an untrained tiny model and the tiny processor (a starting point for CLI runs)."""
    from medgym.rl.policy_model import build_model, save

    model = build_model(tiny_processor, "tiny", seed=0)
    return save(model, tiny_processor, tmp_path_factory.mktemp("tiny") / "init", {"model_id": "tiny-init"})


@pytest.fixture(scope="session")
def tiny_sft(tiny_processor, tiny_source, tmp_path_factory):
    """(folder, cases, losses): a tiny model after a short SFT on 32 expert conversations, saved to a folder."""
    from medgym.rl.config import SFTConfig
    from medgym.rl.metrics import MetricsCallback, MetricsLog
    from medgym.rl.policy_model import build_model, save
    from medgym.rl.sft import train_sft

    out = tmp_path_factory.mktemp("tiny")
    model = build_model(tiny_processor, "tiny", seed=0)
    cases = [tiny_source.case(s) for s in SFT_SEEDS]
    args = SFTConfig(
        output_dir=str(out / "run"),
        train_seeds=[SFT_SEEDS[0], len(SFT_SEEDS)],
        num_train_epochs=10,
        learning_rate=5e-3,
        per_device_train_batch_size=1,
        save_steps=0,
        disable_tqdm=True,
        tool_mode=TINY_TOOL_MODE,
    )
    metrics = MetricsLog(out / "run")
    train_sft(model, tiny_processor, cases, args, [MetricsCallback(metrics)])
    losses = [r["loss"] for r in metrics.rows() if "loss" in r]
    folder = save(model, tiny_processor, out / "sft", {"model_id": "tiny-sft"}, tool_mode=TINY_TOOL_MODE)
    return folder, cases, losses
