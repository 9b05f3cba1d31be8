"""Contracts shared by the control and data planes: Arrow schemas, SQL models,
settings, task records, states and errors."""

from __future__ import annotations

__all__: list[str] = []
