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


def test_the_python_api_exports_exactly_its_public_names() -> None:
    """httpx's test_exported_members: nothing public is exported by accident, nothing is left out."""
    import inspect

    import pipeline
    from pipeline import api

    public = sorted(
        name
        for name, value in vars(api).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and (getattr(value, "__module__", "").startswith(("pipeline.", "schemas.")) or name.isupper())
    )

    assert sorted(api.__all__) == public
    assert sorted(pipeline.__all__) == public
    assert all(getattr(pipeline, name) is getattr(api, name) for name in public)


def test_every_command_of_the_cli_has_its_operation_in_the_python_api() -> None:
    from pipeline import api
    from pipeline.cli import app

    operations = {
        "run": "submit",
        "submit": "submit",
        "status": "job_status",
        "wait": "wait",
        "logs": "job_events",
        "jobs": "list_jobs",
        "results": "export_results",
        "plan": "plan",
        "budget": "set_budget",
        "costs": "costs",
        "cancel": "cancel",
        "resume": "resume",
        "retry-errors": "retry_errors",
    }
    commands = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}

    assert set(operations) <= commands
    assert all(name in api.__all__ for name in operations.values())


def test_the_readme_configuration_lists_every_setting_with_its_default() -> None:
    """The README's TOML blocks are read as settings: no key that does not exist, every key of
    every section in the Configuration block with its default, every backend and schedule key shown."""
    import re
    import tomllib
    from pathlib import Path

    from pydantic import BaseModel

    from schemas.backends import ApiProvider, BatchLane, GpuPool
    from schemas.schedules import Schedule
    from schemas.settings import Settings

    blocks = [
        tomllib.loads(b)
        for b in re.findall(r"```toml\n(.*?)```", (Path(__file__).parents[1] / "README.md").read_text(), re.S)
    ]
    config = next(b for b in blocks if "control_queue" in b)
    depends_on_the_machine = {
        ("database", "url"),
        ("broker", "url"),
        ("storage", "hot"),
        ("storage", "warm"),
        ("storage", "cold"),
    }
    problems = []
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            continue
        written = config.get(name, {}) if name != "routing" else {**config.get(name, {}), **{"rules": None}}
        for key, option in section.model_fields.items():
            if key not in written:
                problems.append(f"[{name}] {key} is missing")
            elif (
                (name, key) not in depends_on_the_machine
                and option.default_factory is None
                and written[key] != option.default
            ):
                problems.append(f"[{name}] {key} = {written[key]!r}, but the default is {option.default!r}")
        problems += [f"[{name}] {key} is not a setting" for key in written if key not in section.model_fields]
    for model, key in ((GpuPool, "gpu_pools"), (ApiProvider, "api_providers"), (Schedule, "schedules")):
        shown: set[str] = set()
        for block in blocks:
            for entry in block.get(key, []):
                shown |= set(entry)
        problems += [f"[[{key}]] {k} is not shown" for k in sorted(set(model.model_fields) - shown - {"kind", "queue"})]
        problems += [f"[[{key}]] {k} is not a setting" for k in sorted(shown - set(model.model_fields))]
    lanes = [entry["batch"] for block in blocks for entry in block.get("api_providers", []) if "batch" in entry]
    for key, option in BatchLane.model_fields.items():
        if not any(key in lane for lane in lanes):
            problems.append(f"[api_providers.batch] {key} is not shown")
        elif option.default is not None and not any(lane.get(key) == option.default for lane in lanes if key in lane):
            problems.append(f"[api_providers.batch] {key} is never shown with its default {option.default!r}")

    assert problems == []


def test_every_module_imports_on_its_own() -> None:
    """An import cycle shows only when the cycle's module is imported first: import each
    module of ours first, in a process where none of ours is loaded yet."""
    code = (
        "import importlib, pkgutil, sys\n"
        "names = [m.name for p in ('schemas', 'pipeline', 'workers')"
        " for m in pkgutil.walk_packages(importlib.import_module(p).__path__, p + '.')"
        " if not m.name.endswith('__main__')]\n"
        "failed = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] in ('schemas', 'pipeline', 'workers', 'migrations')\n"
        "                   and m != 'pipeline.metrics']:  # Prometheus metrics register once per process\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {exc}')\n"
        "print(len(names)); print('\\n'.join(failed))\n"
    )

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    count, *failed = result.stdout.strip().split("\n")
    assert int(count) > 60 and failed == []
