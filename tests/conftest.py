"""Shared fixtures: offline model loading, a cache folder per session, the standard tool context."""

from __future__ import annotations

import os
from pathlib import Path

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


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def chromium():
    """Launch Debian's chromium headless through Playwright: call it with a ``sync_playwright()`` handle.

    Background networking is off: this machine's closed network refuses Chromium's own calls.
    """
    if not CHROMIUM.exists():
        pytest.skip("needs Debian chromium at /usr/bin/chromium (the README's test command installs it)")
    return lambda pw: pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
