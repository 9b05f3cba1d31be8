"""The same engine on transformers' continuous batching (``worker.engine = "continuous"``).

Requests join a running batch as soon as a slot frees up, instead of waiting for
the longest row of a static micro-batch: ``ContinuousBatchingManager`` with each
row's own ``max_new_tokens``. Tokenisation, limits, decoding and the output are
those of ``HFEngine``. One manager per sampling temperature, started for a chunk
and stopped (kept warm on the model) after it: its generation thread is not a
daemon, and a thread left running would keep the worker process from exiting.
"""

from __future__ import annotations

import time
from typing import Any

from workers.engines.base import Completion
from workers.engines.batching import BatchItem
from workers.engines.hf import HFEngine

__all__ = ["ContinuousHFEngine"]


class ContinuousHFEngine(HFEngine):
    _managers: dict[float, Any]

    def _manager(self, temperature: float) -> Any:
        from transformers import GenerationConfig

        managers = self.__dict__.setdefault("_managers", {})
        if temperature not in managers:
            sampling: dict[str, Any] = (
                {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            )
            config = GenerationConfig(  # type: ignore[no-untyped-call]
                max_new_tokens=self.max_positions or 2048,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids) or -1,
                **sampling,
            )
            manager = self.lm.init_continuous_batching(generation_config=config)
            manager.start()
            managers[temperature] = manager
        return managers[temperature]

    def _execute(self, items: list[BatchItem], prompts: dict[int, list[int]]) -> dict[int, Completion]:
        if not items:  # every row of the chunk was answered already (the answer cache, repeats)
            return {}
        # transformers' continuous batching takes no logits processor: a row with a
        # schema runs on the batched path of the same model, constrained.
        constrained = [item for item in items if item.schema]
        done = super()._execute(constrained, prompts) if constrained else {}
        items = [item for item in items if not item.schema]
        try:
            return {**done, **self._run(items, prompts)}
        finally:
            for manager in self.__dict__.pop("_managers", {}).values():
                manager.stop(block=True, keep_for_next_session=True)

    def _run(self, items: list[BatchItem], prompts: dict[int, list[int]]) -> dict[int, Completion]:
        by_request: dict[str, BatchItem] = {}
        started = time.perf_counter()
        for item in items:
            request_id = f"row-{item.index}-{time.monotonic_ns()}"
            by_request[request_id] = item
            self._manager(item.temperature).add_request(
                prompts[item.index], request_id=request_id, max_new_tokens=item.max_new_tokens
            )
        done: dict[int, Completion] = {}
        managers = {item.temperature for item in items}
        while len(done) < len(items):
            for temperature in managers:
                result = self._manager(temperature).get_result(timeout=0.05)
                if result is None or result.request_id not in by_request:
                    continue
                item = by_request[result.request_id]
                if result.error:
                    done[item.index] = Completion.failed(f"generation failed: {result.error}", item.prompt_tokens)
                    continue
                text, finish, n_out = self._finish(item, list(result.generated_tokens))
                elapsed = time.perf_counter() - started
                done[item.index] = Completion(
                    text, finish, item.prompt_tokens, n_out, elapsed * 1000.0, elapsed / len(items)
                )
        return done
