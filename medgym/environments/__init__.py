"""Task sources, templates, rewards and the Gymnasium environment ``medgym/MedVQA-v0``."""

from __future__ import annotations

import gymnasium

ENV_ID = "medgym/MedVQA-v0"
MAX_EPISODE_STEPS = 8

if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="medgym.environments.env:MedVQAEnv", max_episode_steps=MAX_EPISODE_STEPS)

__all__ = ["ENV_ID", "MAX_EPISODE_STEPS"]
