"""The zoo's tiny models, each built once per test session (the shared tokenizer is trained once)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    """``zoo_dir(arch) -> folder`` of a tiny model of that architecture, built on first use (seed 0)."""
    from medgym.models.zoo import init_model

    root = tmp_path_factory.mktemp("zoo")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            init_model(arch, root / arch, size="tiny", seed=0)
            built[arch] = root / arch
        return built[arch]

    return get


@pytest.fixture
def zoo_model(zoo_dir):
    """``zoo_model(arch) -> (model, processor)``: a fresh copy of the tiny model loaded from its folder, in train mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    def get(arch: str):
        folder = zoo_dir(arch)
        return AutoModelForImageTextToText.from_pretrained(folder).train(), AutoProcessor.from_pretrained(folder)

    return get


@pytest.fixture(scope="session")
def look_case():
    """A phantom case whose predicted-mode expert calls ``detect`` (it returns a picture) and then answers."""
    from medgym.environments.expert import expert_calls
    from medgym.environments.sources import PhantomSource

    case = PhantomSource().case(25)
    assert [c.name for c in expert_calls(case, "predicted")] == ["detect"]
    return case
