"""medgym: agents that think with medical images: tools, tasks, environments, training, traces."""

from __future__ import annotations

__version__ = "0.1.0"
