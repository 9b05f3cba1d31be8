"""``spotlane serve``: OpenAI's Files and Batches API over spotlane's jobs, for tenant keys."""
