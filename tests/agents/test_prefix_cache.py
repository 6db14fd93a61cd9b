"""The local backend runs the system turn (system text, tool list) once and starts every turn after it."""

from __future__ import annotations

import functools

import gymnasium as gym
import pytest

from medgym.agents.backends import EmbeddedBackend
from medgym.environments.evaluate import ENV_ID, run_episode


def _run(backend: EmbeddedBackend, seeds: tuple[int, ...]) -> tuple[list[str], list[int]]:
    """The backend's turns on the cases, and how many tokens each turn's first forward was given."""
    turns: list[str] = []
    fed: list[int] = []
    forward, next_turn = backend.model.forward, backend.next_turn

    @functools.wraps(forward)  # generate checks its arguments against the forward's signature
    def counting(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # a turn's prompt (decoding feeds one token)
            fed.append(int(ids.shape[1]))
        return forward(*args, **kwargs)

    def keep(messages, *, temperature=0.0):
        turns.append(next_turn(messages, temperature=temperature))
        return turns[-1]

    backend.model.forward, backend.next_turn = counting, keep
    env = gym.make(ENV_ID, source="phantom", tool_mode="predicted", segmenter="threshold")
    try:
        for seed in seeds:
            run_episode(env, backend, seed)
    finally:
        del backend.model.forward, backend.next_turn
    return turns, fed


@pytest.fixture(scope="module")
def backends():
    plain = EmbeddedBackend(constrained=True)
    plain.prefix_cache = False
    return EmbeddedBackend(constrained=True), plain


def test_cached_system_turn_gives_the_same_turns_with_fewer_tokens_run(backends):
    cached, plain = backends
    seeds = (0, 1, 2)  # tool rounds with pictures (segment, zoom) and a look-up (retrieve)
    cached_turns, cached_fed = _run(cached, seeds)
    plain_turns, plain_fed = _run(plain, seeds)
    assert len(plain_turns) >= 6 and cached_turns == plain_turns
    system_turn = len(cached._prefix[0])
    assert system_turn > 200 and plain._prefix is None
    assert len(cached_fed) == len(plain_fed) == len(plain_turns)
    assert [p - c for p, c in zip(plain_fed, cached_fed, strict=True)] == [system_turn] * len(plain_fed)


def test_a_different_system_turn_is_not_served_from_the_cache(backends):
    cached, _ = backends
    _run(cached, (0,))
    before = cached._prefix[0]
    cached.system_prompt = cached.system_prompt + " Answer briefly."
    try:
        _run(cached, (0,))
        assert cached._prefix[0] != before and len(cached._prefix[0]) > len(before)
    finally:
        cached.system_prompt = cached.system_prompt.removesuffix(" Answer briefly.")
