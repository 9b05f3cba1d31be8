"""The job-facing operations: submit, plan, cancel/resume/budget, retry, reading status and results."""
