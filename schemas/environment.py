"""Where settings come from besides the model: the config file's path, and the
``SPOTLANE_*`` environment variables (those that are not settings are warned about
once and ignored, never read as settings)."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel

from schemas.errors import ConfigError

__all__ = ["ENV_PREFIX", "config_path", "known_env_names", "warn_unknown_env"]

log = logging.getLogger(__name__)

ENV_PREFIX = "SPOTLANE_"
#: Environment variables that are not settings keys but are ours all the same:
#: the config file and home, the compose image, and the test suite's own.
_EXTRA_ENV = {"SPOTLANE_CONFIG", "SPOTLANE_HOME", "SPOTLANE_IMAGE"}
_EXTRA_ENV_PREFIXES = ("SPOTLANE_TEST_",)


def known_env_names(model: type[BaseModel], prefix: str) -> set[str]:
    names: set[str] = set()
    for field_name, field in model.model_fields.items():
        name = f"{prefix}{field_name.upper()}"
        names.add(name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= known_env_names(annotation, f"{name}__")
    return names


#: Unknown ``SPOTLANE_*`` variables already warned about in this process.
_WARNED: set[str] = set()


def warn_unknown_env(environ: Mapping[str, str], known: set[str]) -> None:
    """Warn once about each ``SPOTLANE_*`` variable that is not a setting, naming the
    setting it most likely meant to be; it is ignored (it must not break every command)."""
    for key in sorted(environ):
        upper = key.upper()
        if (
            not upper.startswith(ENV_PREFIX)
            or upper in known
            or upper in _EXTRA_ENV
            or upper.startswith(_EXTRA_ENV_PREFIXES)
            or upper in _WARNED
        ):
            continue
        _WARNED.add(upper)
        bare = {name[len(ENV_PREFIX) :]: name for name in known}
        near = difflib.get_close_matches(upper[len(ENV_PREFIX) :], sorted(bare), n=1, cutoff=0.75)
        hint = f"; did you mean {bare[near[0]]}?" if near else ""
        log.warning("ignoring environment variable %s: it is not a spotlane setting%s", key, hint)


def config_path(config: str | Path | None, environ: Mapping[str, str], default: str) -> Path | None:
    """The config file: ``config``, else ``$SPOTLANE_CONFIG``, else ``default`` in the working folder if there."""
    if config is not None:
        path = Path(config).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist", setting="--config")
        return path
    if environ.get("SPOTLANE_CONFIG"):
        path = Path(environ["SPOTLANE_CONFIG"]).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"config file {path} (from SPOTLANE_CONFIG) does not exist",
                setting="SPOTLANE_CONFIG",
            )
        return path
    path = Path.cwd() / default
    return path if path.is_file() else None
