"""Tests of the contracts (``schemas/``)."""
