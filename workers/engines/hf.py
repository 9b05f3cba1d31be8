"""A generation engine on Hugging Face transformers and torch.

The model is loaded once per process (``load_engine`` caches it) with
``from_pretrained``: bfloat16 on CUDA, float32 on CPU using every core. A list of
requests is tokenized, planned into micro-batches under a padded-token budget
(``workers.engines.batching``), generated with the KV cache from left-padded inputs, and
put back in input order. Greedy decoding gives the same text however a row was
batched. On CUDA out-of-memory a micro-batch is halved and retried; a row that
still fails alone becomes an error row.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from threading import Lock
from typing import TYPE_CHECKING, Any

from schemas.errors import ModelError
from workers.engines.base import Completion, Request
from workers.engines.batching import BatchItem, plan_batches, prefix_groups
from workers.engines.grammar import GrammarError, Grammars

if TYPE_CHECKING:
    pass

__all__ = ["HFEngine", "load_engine"]

log = logging.getLogger(__name__)

#: Models kept loaded per process, least recently used dropped first: rows may
#: name models of their own, and each loaded model holds its weights.
MAX_LOADED = 2
#: A shared opening shorter than this is run with each row (a pass of its own costs more).
MIN_SHARED_PREFIX = 16
_ENGINES: OrderedDict[tuple[str, str, str], HFEngine] = OrderedDict()
_LOCK = Lock()


def _import_torch() -> Any:
    try:
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no "Loading weights" bars
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError(
            "the GPU worker needs torch and transformers: pip install 'spotlane' "
            "(on a CPU-only machine run `pip install torch==2.13.0` first)"
        ) from exc
    return torch, transformers


def _pick_device(device: str) -> str:
    torch, _ = _import_torch()
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class HFEngine:
    """Batched generation with one ``transformers`` causal LM."""

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        token_budget: int = 32768,
        max_batch_rows: int = 64,
        compile: bool = False,
        prefix_reuse: bool = True,
    ) -> None:
        torch, transformers = _import_torch()
        self.model = model
        #: Compute a micro-batch's shared opening once (``_generate_batch``).
        self.prefix_reuse = prefix_reuse
        #: Prompt tokens the model ran (prefill) and those it took from a shared prefix's cache.
        self.prefill_tokens = 0
        self.prefill_reused = 0
        self.device = _pick_device(device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.dtype = dtype
        self.token_budget = token_budget
        self.max_batch_rows = max_batch_rows
        if self.device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model)
            kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
            if self.device.startswith("cuda"):
                kwargs["attn_implementation"] = "sdpa"
            self.lm = transformers.AutoModelForCausalLM.from_pretrained(model, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot load model {model!r}: {exc}", model=model) from exc
        self.lm.to(self.device)
        self.lm.eval()
        if compile:
            try:
                self.lm.forward = torch.compile(self.lm.forward, dynamic=True)
            except Exception as exc:  # an unsupported platform: run eagerly
                log.warning("torch.compile unavailable (%s); running eagerly", exc)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        gen = self.lm.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_id: int = int(self.tokenizer.pad_token_id)
        self.max_positions: int | None = getattr(self.lm.config, "max_position_embeddings", None)
        self._grammars: Grammars | None = None

    def grammars(self) -> Grammars:
        """This model's compiled JSON Schema grammars (built on first use)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, int(self.lm.config.vocab_size), sorted(self.eos_ids))
        return self._grammars

    # -- tokenizing ---------------------------------------------------------------

    def _prompt_ids(self, request: Request) -> list[int]:
        if request.messages is not None:
            if getattr(self.tokenizer, "chat_template", None):
                ids = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
                if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
                    ids = ids["input_ids"]
                return list(ids)
            text = "".join(f"{m['role']}: {m['content']}\n" for m in request.messages) + "assistant:"
            return list(self.tokenizer(text)["input_ids"])
        return list(self.tokenizer(request.prompt or "")["input_ids"])

    # -- generating ---------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        prompts: dict[int, list[int]] = {}
        items: list[BatchItem] = []
        groups = prefix_groups(requests) if self.prefix_reuse else [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                ids = self._prompt_ids(request)
            except Exception as exc:  # a template or tokenizer refusing one row
                results[i] = Completion.failed(f"could not tokenize the request: {exc}")
                continue
            max_new = request.max_tokens
            if self.max_positions is not None:
                room = self.max_positions - len(ids)
                if room < 1:
                    results[i] = Completion.failed(  # it never ran: it counts no tokens
                        f"prompt too long: {len(ids)} tokens, the model's context is {self.max_positions}"
                    )
                    continue
                max_new = min(max_new, room)
            if not ids:
                results[i] = Completion.failed("prompt is empty")
                continue
            if request.response_schema is not None:
                try:
                    self.grammars().check(request.response_schema)
                except (GrammarError, ValueError) as exc:  # refused at submit; a row's own one lands here
                    results[i] = Completion.failed(f"response_format: {exc}")
                    continue
            prompts[i] = ids
            items.append(
                BatchItem(i, len(ids), max_new, float(request.temperature), request.response_schema, groups[i])
            )
        for index, completion in self._execute(items, prompts).items():
            results[index] = completion
        return [r if r is not None else Completion.failed("no result") for r in results]

    def _execute(self, items: list[BatchItem], prompts: dict[int, list[int]]) -> dict[int, Completion]:
        """Length-grouped static micro-batches under the token budget."""
        done: dict[int, Completion] = {}
        for batch in plan_batches(items, self.token_budget, self.max_batch_rows):
            for item, completion in zip(batch, self._run_batch(batch, prompts), strict=True):
                done[item.index] = completion
        return done

    def _finish(self, item: BatchItem, tokens: list[int]) -> tuple[str, str, int]:
        """Text, finish reason and token count of one row's generated ids."""
        tokens = tokens[: item.max_new_tokens]
        finish = "length"
        for pos, tok in enumerate(tokens):
            if tok in self.eos_ids:
                tokens, finish = tokens[: pos + 1], "stop"
                break
        text = self.tokenizer.decode([t for t in tokens if t not in self.eos_ids], skip_special_tokens=True)
        return text, finish, len(tokens)

    def _run_batch(self, batch: list[BatchItem], prompts: dict[int, list[int]]) -> list[Completion]:
        torch, _ = _import_torch()
        try:
            return self._generate_batch(batch, prompts)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                torch.cuda.empty_cache()
                return [Completion.failed("out of memory generating this row alone", batch[0].prompt_tokens)]
            torch.cuda.empty_cache()
            half = len(batch) // 2
            log.warning("out of memory on a batch of %d rows; halving", len(batch))
            return self._run_batch(batch[:half], prompts) + self._run_batch(batch[half:], prompts)
        except Exception as exc:
            if len(batch) == 1:
                return [
                    Completion.failed(f"generation failed: {exc.__class__.__name__}: {exc}", batch[0].prompt_tokens)
                ]
            log.warning("batch of %d rows failed (%s); retrying row by row", len(batch), exc)
            return [c for item in batch for c in self._run_batch([item], prompts)]

    def _shared_prefix(self, batch: list[BatchItem], prompts: dict[int, list[int]]) -> int:
        """How many leading tokens every row of ``batch`` shares (0: too few to be worth a
        pass of their own); at least one token of each row is left to run with the batch."""
        if not self.prefix_reuse or len(batch) < 2 or batch[0].prefix is None:
            return 0
        rows = [prompts[it.index] for it in batch]
        most = min(len(r) for r in rows) - 1
        shared = 0
        first = rows[0]
        while shared < most and all(r[shared] == first[shared] for r in rows):
            shared += 1
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def _generate_batch(self, batch: list[BatchItem], prompts: dict[int, list[int]]) -> list[Completion]:
        """One micro-batch. Rows are left-padded, except when they share a prefix: then the
        prefix is run once, its KV cache copied to every row, and the rows laid out as
        ``prefix | padding | rest`` (the padding masked out, positions counted over the
        real tokens only), which gives the same tokens as running each row whole."""
        torch, transformers = _import_torch()
        shared = self._shared_prefix(batch, prompts)
        width = max(it.prompt_tokens for it in batch)
        max_new = max(it.max_new_tokens for it in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            ids = prompts[item.index]
            input_ids[row, width - len(ids) + shared :] = torch.tensor(ids[shared:], dtype=torch.long)
            attention[row, width - len(ids) + shared :] = 1
            if shared:
                input_ids[row, :shared] = torch.tensor(ids[:shared], dtype=torch.long)
                attention[row, :shared] = 1
        extra: dict[str, Any] = {}
        if shared:
            from transformers.generation import utils as generation

            # transformers 5 renames the models' ``past_key_values`` to ``cache``.
            cache_kwarg = "cache" if "cache" in getattr(generation, "ALL_CACHE_NAMES", ()) else "past_key_values"
            cache = transformers.DynamicCache()
            with torch.inference_mode():
                self.lm(input_ids=input_ids[:1, :shared].to(self.device), use_cache=True, **{cache_kwarg: cache})
            cache.batch_repeat_interleave(len(batch))
            extra[cache_kwarg] = cache
        self.prefill_tokens += sum(it.prompt_tokens for it in batch) - shared * (len(batch) - 1)
        self.prefill_reused += shared * (len(batch) - 1)
        temperature = batch[0].temperature
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        processor = self.grammars().processor([it.schema for it in batch]) if any(it.schema for it in batch) else None
        if processor is not None:
            sampling["logits_processor"] = [processor]
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.lm.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=max_new,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids) or None,
                use_cache=True,
                **extra,
                **sampling,
            )
        elapsed = time.perf_counter() - started
        generated = out[:, width:].tolist()
        completions: list[Completion] = []
        useful = [0] * len(batch)
        decoded: list[tuple[str, str, int]] = []
        for row, item in enumerate(batch):
            decoded.append(self._finish(item, generated[row]))
            useful[row] = item.prompt_tokens + decoded[-1][2]
        total = sum(useful) or 1
        for row, item in enumerate(batch):
            text, finish, n_out = decoded[row]
            completions.append(
                Completion(
                    output=text,
                    finish_reason=finish,
                    input_tokens=item.prompt_tokens,
                    output_tokens=n_out,
                    latency_ms=elapsed * 1000.0,
                    compute_seconds=elapsed * useful[row] / total,
                )
            )
        return completions


def load_engine(
    model: str,
    *,
    device: str,
    dtype: str,
    token_budget: int,
    max_batch_rows: int,
    kind: str = "batched",
    compile: bool = False,
) -> HFEngine:
    """The process's engine for ``model`` (loaded on first use, then reused).

    ``kind``: ``batched`` (spotlane's length-grouped micro-batches) or
    ``continuous`` (transformers' continuous batching manager).
    """
    key = (model, device, dtype + ":" + kind)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is not None:
            _ENGINES.move_to_end(key)
        else:
            while len(_ENGINES) >= MAX_LOADED:
                _, dropped = _ENGINES.popitem(last=False)
                log.info("unloading model %s to make room", dropped.model)
                del dropped
            log.info("loading model %s (%s engine)", model, kind)
            cls: type[HFEngine] = HFEngine
            if kind == "continuous":
                from workers.engines.hf_continuous import ContinuousHFEngine

                cls = ContinuousHFEngine
            engine = cls(
                model,
                device=device,
                dtype=dtype,
                token_budget=token_budget,
                max_batch_rows=max_batch_rows,
                compile=compile,
            )
            _ENGINES[key] = engine
        engine.token_budget, engine.max_batch_rows = token_budget, max_batch_rows
        return engine
