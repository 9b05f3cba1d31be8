"""Routing: pricing shards on backends, choosing the cheapest that fits, learning from what ran."""
