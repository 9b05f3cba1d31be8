"""The inference engines."""
