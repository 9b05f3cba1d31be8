"""Sentence embeddings with a Hugging Face encoder: the ``embed`` task.

Loads ``AutoModel`` once per process, batches texts by length under the same
padded-token budget as generation (``workers.engines.batching``), pools the last hidden
states the way the model's sentence-transformers config says (mean by default,
CLS if asked), and L2-normalises when the config's modules include ``Normalize``.
Each row's embedding travels in ``Completion.embedding``; the output gets a
``list<float32>`` column ``embedding``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from threading import Lock
from typing import Any

from schemas.errors import ModelError
from workers.engines.base import Completion, Request
from workers.engines.batching import BatchItem, plan_batches

__all__ = ["HFEmbedder", "load_embedder"]

log = logging.getLogger(__name__)
_EMBEDDERS: dict[tuple[str, str], HFEmbedder] = {}
_LOCK = Lock()


def _pooling(model: str) -> tuple[str, bool]:
    folder = Path(model)
    mode, normalize = "mean", False
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file() and json.loads(pooling.read_text()).get("pooling_mode_cls_token"):
        mode = "cls"
    modules = folder / "modules.json"
    if modules.is_file():
        normalize = any("Normalize" in m.get("type", "") for m in json.loads(modules.read_text()))
    return mode, normalize


class HFEmbedder:
    """Pooled sentence embeddings; one instance per model and device per process."""

    def __init__(
        self, model: str, *, device: str = "auto", token_budget: int = 32768, max_batch_rows: int = 64
    ) -> None:
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]

        self.model = model
        self.device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.token_budget, self.max_batch_rows = token_budget, max_batch_rows
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model)
            dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
            self.encoder = transformers.AutoModel.from_pretrained(model, dtype=dtype).to(self.device).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot load embedding model {model!r}: {exc}", model=model) from exc
        self.mode, self.normalize = _pooling(model)
        self.max_length = int(min(getattr(self.tokenizer, "model_max_length", 512) or 512, 8192))

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        ids: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            if r.prompt is None and any(m.get("content") is None for m in (r.messages or [])):
                results[i] = Completion.failed("a message has no content")  # this row only
                continue
            text = r.prompt if r.prompt is not None else "\n".join(str(m["content"]) for m in (r.messages or []))
            ids[i] = self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]
        items = [BatchItem(i, len(x), 0) for i, x in ids.items()]
        for batch in plan_batches(items, self.token_budget, self.max_batch_rows):
            for it, completion in zip(batch, self._run_batch(batch, ids), strict=True):
                results[it.index] = completion
        return [r if r is not None else Completion.failed("no result") for r in results]

    def _run_batch(self, batch: list[BatchItem], ids: dict[int, list[int]]) -> list[Completion]:
        """Embed a micro-batch; on out-of-memory, halve it (a row alone that still does not fit fails)."""
        import torch

        try:
            return self._embed(batch, ids)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(batch) == 1:
                return [Completion.failed("out of memory embedding this row alone", batch[0].prompt_tokens)]
            half = len(batch) // 2
            log.warning("out of memory on a batch of %d rows; halving", len(batch))
            return self._run_batch(batch[:half], ids) + self._run_batch(batch[half:], ids)

    def _embed(self, batch: list[BatchItem], ids: dict[int, list[int]]) -> list[Completion]:
        import torch

        width = max(it.prompt_tokens for it in batch)
        input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, it in enumerate(batch):
            input_ids[row, : it.prompt_tokens] = torch.tensor(ids[it.index])
            mask[row, : it.prompt_tokens] = 1
        started = time.perf_counter()
        with torch.inference_mode():
            hidden = self.encoder(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
            ).last_hidden_state
            m = mask.to(self.device).unsqueeze(-1).to(hidden.dtype)
            pooled = hidden[:, 0] if self.mode == "cls" else (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        vectors: list[Any] = pooled.float().cpu().tolist()
        elapsed = time.perf_counter() - started
        total = sum(it.prompt_tokens for it in batch) or 1
        return [
            Completion(
                output=None,
                finish_reason="embedding",
                input_tokens=it.prompt_tokens,
                output_tokens=0,
                latency_ms=elapsed * 1000,
                compute_seconds=elapsed * it.prompt_tokens / total,
                embedding=vectors[row],
            )
            for row, it in enumerate(batch)
        ]


def load_embedder(model: str, *, device: str, token_budget: int, max_batch_rows: int) -> HFEmbedder:
    with _LOCK:
        key = (model, device)
        if key not in _EMBEDDERS:
            log.info("loading embedding model %s", model)
            _EMBEDDERS[key] = HFEmbedder(model, device=device, token_budget=token_budget, max_batch_rows=max_batch_rows)
        return _EMBEDDERS[key]
