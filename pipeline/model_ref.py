"""Checking a model name at submit time, without importing torch or transformers.

A model is a local folder (made by ``save_pretrained``) or a Hugging Face hub id.
A name that looks like a path must be a folder holding ``config.json``; it is
stored absolute so a worker started elsewhere finds it. A hub id is accepted when
it is in the local cache, or when the hub may be reached (workers download it);
with ``HF_HUB_OFFLINE=1`` an uncached id is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from schemas.errors import ModelError

__all__ = ["resolve_model"]


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a slash is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def resolve_model(name: str) -> str:
    """The canonical model reference for ``name``; raise ``ModelError`` if unusable."""
    name = name.strip()
    if not name:
        raise ModelError("model name is empty", model=name)
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name):
        if not path.is_dir():
            raise ModelError(f"model path {name} is not a folder", model=name)
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model folder {name} has no config.json (save it with save_pretrained)",
                model=name,
            )
        return str(path.resolve())
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return name
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelError(
            f"model {name!r} is neither a local folder nor in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set",
            model=name,
        )
    return name
