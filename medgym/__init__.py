"""medgym: agents that think with medical images: tools, tasks, environments, training, traces.

``import medgym`` registers the Gymnasium environment ``medgym/MedVQA-v0`` (as ``import ale_py``
registers its games): ``gym.make("medgym/MedVQA-v0")`` works after it. The entry point is a
string, so nothing heavy is imported until an env is made.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium

__version__ = "0.1.0"

# The shipped embedded policies (safetensors + processor), written by `medgym train`; package data.
# Named here so the chat (agents) and training (rl) find the same folders without importing each other.
CHECKPOINTS_DIR = Path(__file__).parent / "rl" / "checkpoints"
EMBEDDED_POLICY_DIR = CHECKPOINTS_DIR / "embedded"

ENV_ID = "medgym/MedVQA-v0"
# "predicted": no tool reads ground truth; "oracle": tools may (an upper bound). Here, not in tools, so the
# CLI can offer the choice without importing the tools.
TOOL_MODES = ("predicted", "oracle")
TOOL_MODE_HELP = "predicted: no tool reads ground truth (default); oracle: tools read it (an upper bound)"


def add_tool_mode_option(parser, help: str = TOOL_MODE_HELP, default: str = "predicted") -> None:
    """The ``--tool-mode`` option of every command that runs tools (an ``argparse`` parser)."""
    parser.add_argument("--tool-mode", default=default, choices=list(TOOL_MODES), help=help)


MAX_EPISODE_STEPS = 8

if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="medgym.environments.env:MedVQAEnv", max_episode_steps=MAX_EPISODE_STEPS)
