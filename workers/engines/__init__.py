"""Inference engines: one interface (``base``), one module per implementation, built by ``factory``."""
