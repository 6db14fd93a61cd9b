"""medgym: agents that think with medical images: tools, tasks, environments, training, traces."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# The shipped embedded policy (safetensors + processor), written by `medgym train`; package data.
# Named here so the chat (agents) and training (rl) find the same folder without importing each other.
EMBEDDED_POLICY_DIR = Path(__file__).parent / "rl" / "checkpoints" / "embedded"
