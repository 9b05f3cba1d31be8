"""Whole jobs across real processes and services: end to end, distributed, chaos."""
