"""Which engine runs a backend's rows: transformers for GPU pools (or the pool's own
inference server, ``engine = "server"``), HTTP for API providers.

Engines are created once per worker process and reused across shards. A GPU pool
may be asked for rows naming different models: ``GpuEngines`` loads each model
once (a few at most stay loaded) and sends each row to its own; a row model that
cannot load fails those rows, not the shard.
"""

from __future__ import annotations

import atexit
from collections.abc import Sequence
from threading import Lock

from schemas.backends import ApiProvider, GpuPool
from schemas.errors import ModelError
from schemas.settings import WorkerSettings
from workers.engines.base import Completion, Engine, Request

__all__ = ["GpuEngines", "engine_for"]

_API: dict[tuple[str, str], Engine] = {}
_LOCK = Lock()


@atexit.register
def _close_api_engines() -> None:
    """Close the HTTP sessions of the process's API engines (no unclosed-session noise at exit)."""
    for engine in list(_API.values()):
        close = getattr(engine, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # the process is ending either way
                pass
    _API.clear()


class GpuEngines:
    """Rows grouped by model, each model's rows on that model's transformers engine."""

    def __init__(self, model: str, settings: WorkerSettings) -> None:
        self.model = model
        self.settings = settings

    def _engine(self, model: str) -> Engine:
        from workers.engines.hf import load_engine

        s = self.settings
        return load_engine(
            model,
            device=s.device,
            dtype=s.dtype,
            token_budget=s.token_budget,
            max_batch_rows=s.max_batch_rows,
            kind=s.engine,
            compile=s.compile,
        )

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        by_model: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_model.setdefault(request.model or self.model, []).append(i)
        results: list[Completion | None] = [None] * len(requests)
        for model, indexes in by_model.items():
            try:
                engine = self._engine(model)
            except ModelError as exc:
                if model == self.model:
                    raise  # the shard's own model: the backend cannot run it at all
                for i in indexes:  # one row's model: those rows fail, the rest go on
                    results[i] = Completion.failed(f"model {model!r} could not be loaded: {exc}")
                continue
            for i, completion in zip(indexes, engine.generate([requests[i] for i in indexes]), strict=True):
                results[i] = completion
        return [r if r is not None else Completion.failed("no result") for r in results]


def engine_for(backend: GpuPool | ApiProvider, model: str, settings: WorkerSettings, task: str = "generate") -> Engine:
    """The engine that runs ``backend``'s rows whose default model is ``model``."""
    if isinstance(backend, GpuPool) and backend.engine == "server" and task != "embed":
        from workers.engines.server import ServerEngine

        with _LOCK:
            key = (backend.model_dump_json(), model)
            if key not in _API:
                _API[key] = ServerEngine(backend, model)
            return _API[key]
    if isinstance(backend, GpuPool) and settings.engine == "stub":
        from workers.engines.stub import StubEngine

        return StubEngine(model, settings.stub_seconds_per_row, embed=task == "embed")
    if task == "embed":
        if not isinstance(backend, GpuPool):
            raise ModelError(f"backend {backend.name!r} cannot embed: embeddings run on GPU pools")
        from workers.engines.hf_embed import load_embedder

        return load_embedder(
            model, device=settings.device, token_budget=settings.token_budget, max_batch_rows=settings.max_batch_rows
        )
    if isinstance(backend, GpuPool):
        engine = GpuEngines(model, settings)
        engine._engine(model)  # load now: a model that cannot load fails the shard up front
        return engine
    from workers.engines.openai_http import APIEngine

    with _LOCK:
        key = (backend.model_dump_json(), model)  # a changed provider config gets an engine of its own
        if key not in _API:
            _API[key] = APIEngine(backend, model)
        return _API[key]
