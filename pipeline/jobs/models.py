"""Checking a model name at submit time, without importing torch or transformers.

A model is a local folder (made by ``save_pretrained``) or a Hugging Face hub id.
A folder must hold a readable ``config.json``; it is stored absolute, so a worker
started elsewhere finds it and what is learnt about it is found under one name. A
hub id is accepted when it is in the local cache, or when the hub, asked now,
knows it. Anything else is refused with the reason and, for a name that looks
like a mistyped local path, the nearest folder that is a model.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from schemas.backends import ApiProvider, Backend, ProviderBatchLane
from schemas.errors import ModelError

__all__ = ["lane_identity", "model_identity", "resolve_model"]

#: Seconds the hub gets to say whether it knows a model id.
HUB_TIMEOUT = 5.0


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a slash is a path, and so
    is ``org/name`` when a local folder ``org`` exists (``demo/tiny-modle``)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def _near(name: str) -> str:
    """`` (did you mean demo/tiny-model?)`` when a model folder has a similar name."""
    path = Path(name).expanduser()
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    if not parent.is_dir():
        return ""
    try:
        folders = [p.name for p in parent.iterdir() if (p / "config.json").is_file()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, folders, n=1, cutoff=0.6)
    if not close:
        return ""
    suggestion = str(parent / close[0]) if str(parent) != "." else close[0]
    return f" (did you mean {suggestion}?)"


def _folder(name: str, path: Path) -> str:
    if not path.is_dir():
        raise ModelError(f"model path {name} is not a folder{_near(name)}", model=name)
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"model folder {name} has no config.json (save it with save_pretrained)", model=name)
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model folder {name}: config.json is not readable JSON ({exc})", model=name) from None
    return str(path.resolve())


def resolve_model(name: str) -> str:
    """The canonical model reference for ``name``; raise ``ModelError`` if unusable."""
    name = name.strip()
    if not name:
        raise ModelError("model name is empty", model=name)
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name):
        return _folder(name, path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return name
    hint = _near(name)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ModelError(
            f"model {name!r} is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set{hint}",
            model=name,
        )
    return _ask_the_hub(name, hint)


def _ask_the_hub(name: str, hint: str) -> str:
    """The hub knows ``name`` (workers download it); ``ModelError`` if it does not, or cannot be asked."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT)
    except RepositoryNotFoundError:
        raise ModelError(
            f"model {name!r} is neither a local folder nor a model on the Hugging Face hub{hint}", model=name
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):  # gated or private: a token on the workers may open it
            return name
        raise ModelError(f"model {name!r}: the Hugging Face hub answered {status or exc}{hint}", model=name) from None
    except Exception as exc:  # no network, a proxy, a timeout
        raise ModelError(
            f"model {name!r} is not a local folder and the Hugging Face hub could not be asked whether it exists "
            f"({exc.__class__.__name__}){hint}; download it first or give a local folder",
            model=name,
        ) from None
    return name


#: Files of a model folder whose contents decide its answers besides the weights.
_DECIDING = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
#: Bytes of each weight file read, at its start (the safetensors header: names, shapes,
#: dtypes) and at its end: a retrained checkpoint of the same shapes differs there.
_SAMPLE = 1 << 20


@lru_cache(maxsize=64)
def model_identity(name: str) -> str:
    """What a model's answers depend on, for fingerprints: a local folder by the contents of
    its config, tokenizer, chat template and generation config, and each weight file's
    size and first and last MiB (the same files copied elsewhere are the same model;
    weights retrained in place are not); a hub id by the snapshot of it in the local cache
    (so its revision counts), or by its name if none is cached; a provider's model by its
    name."""
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        if _looks_like_path(name) or name.count("/") > 1:
            return name
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # not a hub id (a provider's model name): its name is its identity
            return name
        if not isinstance(cached, str):
            return name
        path = Path(cached).parent  # .../models--org--name/snapshots/<revision>
    digest = hashlib.sha256()
    for item in sorted(path.iterdir()):
        if item.name in _DECIDING:
            digest.update(item.name.encode() + b"\0" + item.read_bytes())
        elif item.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            size = item.stat().st_size
            with item.open("rb") as fh:
                head = fh.read(_SAMPLE)
                fh.seek(max(0, size - _SAMPLE))
                tail = fh.read(_SAMPLE)
            digest.update(f"{item.name}:{size}".encode() + head + tail)
    return f"folder:{digest.hexdigest()[:32]}"


def lane_identity(backend: Backend, model: str) -> str:
    """The model as a lane runs it: a provider's own model name at its URL (two providers
    may map one name to different models, and they answer a prompt as a chat; its batch
    lane runs the same model), a GPU pool's model by ``model_identity`` (any pool
    running the same files answers alike)."""
    if isinstance(backend, ProviderBatchLane):
        backend = backend.provider
    if isinstance(backend, ApiProvider):
        return f"api:{backend.base_url}:{backend.models.get(model, model)}"
    return f"local:{model_identity(model)}"
