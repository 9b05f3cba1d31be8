"""What the control queue runs: the Celery app and task names, finalizing, the reaper, the scheduler."""
