"""The public surface and the layering rules the code promises."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["pipeline", "workers", "schemas"])
def test_every_name_in_all_is_exported(package: str) -> None:
    module = importlib.import_module(package)

    missing = [name for name in module.__all__ if not hasattr(module, name)]

    assert missing == []


def test_the_control_plane_never_imports_torch_or_transformers() -> None:
    code = (
        "import sys, pipeline, pipeline.cli.app, pipeline.routing.router, pipeline.tasks.finalize, pipeline.tasks.reaper, pipeline.tasks.app;"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"


def test_cli_help_lists_every_command() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)

    for command in ("run", "submit", "worker", "status", "jobs", "results", "example", "db", "config"):
        assert command in result.stdout
