"""What the control queue runs: finalizing, the reaper, schedules, the broker."""
