"""Commands of training: medgym train sft / grpo, quickstart."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this subpackage's subcommands to the `medgym` parser."""
