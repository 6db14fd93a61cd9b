"""Shared fixtures: offline model loading, a cache folder per session, the standard tool context."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _medgym_cache(tmp_path_factory):
    """Keep index caches out of the user's home during tests."""
    if "MEDGYM_CACHE" not in os.environ:
        os.environ["MEDGYM_CACHE"] = str(tmp_path_factory.mktemp("medgym-cache"))
    yield


@pytest.fixture
def ctx():
    from medgym.environments.checks import check_context

    return check_context()
