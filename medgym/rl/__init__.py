"""Training: the embedded policy, SFT on expert traces, GRPO through TRL's environment_factory."""
