"""The job store: claims, state moves, fencing, the state machine."""
