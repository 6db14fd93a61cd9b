"""Commands of the agent: chat in the terminal and on the web."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this subpackage's subcommands to the `medgym` parser."""
