"""Object storage, inputs and the lifecycle."""
