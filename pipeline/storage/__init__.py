"""Object storage: the tiers, input files, and the lifecycle of results."""
