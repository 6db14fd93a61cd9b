"""Task sources, templates, rewards, the call runner, the episode recorder and ``medgym/MedVQA-v0``.

The env is registered by ``import medgym`` (see :mod:`medgym`); the names are re-exported here.
"""

from __future__ import annotations

from medgym import ENV_ID, MAX_EPISODE_STEPS

__all__ = ["ENV_ID", "MAX_EPISODE_STEPS"]
