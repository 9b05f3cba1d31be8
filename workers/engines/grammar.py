"""Constrained decoding: every generated token allowed by the row's JSON Schema.

Built on llguidance (the grammar engine behind llama.cpp's and vLLM's guidance
backends; chosen over xgrammar here for a lighter install: no triton, no torch
pin, and ~10 us per token mask on a CPU). One ``Grammars`` per engine holds the
tokenizer's token table and a cache of compiled grammars, one per schema. For a
micro-batch, ``processor`` returns a logits processor with one matcher per row
that has a schema: before each token it fills the rows' allowed-token bitmask and
applies it on the logits' device; after it, each matcher consumes its row's token.
Rows without a schema, and rows whose grammar has ended, are left alone.

Whitespace between JSON tokens is not free (``whitespace_flexible`` off), so a
weak model cannot spin on spaces; only ``max_tokens`` can cut an answer short.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

__all__ = ["GrammarError", "Grammars", "SchemaProcessor"]

log = logging.getLogger(__name__)


class GrammarError(ValueError):
    """A schema the grammar engine cannot constrain (the message names why)."""


def _llguidance() -> Any:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    return llguidance


class Grammars:
    """Compiled grammars for one tokenizer, cached per schema."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        ll = _llguidance()
        eos = sorted(eos_ids)
        self.tokenizer = ll.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos or None)
        self.vocab_size = vocab_size
        self.eos_ids = eos
        self.executor = ll.LLExecutor()
        self._compiled: dict[str, str] = {}

    def grammar(self, schema: str) -> str:
        """The compiled grammar of ``schema`` (JSON text); ``GrammarError`` if it cannot be constrained."""
        if schema not in self._compiled:
            ll = _llguidance()
            try:
                grammar = ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
            except Exception as exc:  # llguidance raises ValueError or its own errors
                raise GrammarError(f"the schema cannot be constrained: {exc}") from None
            error = ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
            if error:
                raise GrammarError(f"the schema cannot be constrained: {error}")
            self._compiled[schema] = grammar
        return self._compiled[schema]

    def check(self, schema: str) -> None:
        """Raise ``GrammarError`` unless ``schema`` can be constrained (compiles it once)."""
        self.grammar(schema)

    def processor(self, schemas: Sequence[str | None]) -> SchemaProcessor | None:
        """A logits processor for a batch whose row ``i`` follows ``schemas[i]`` (None: free)."""
        if not any(schemas):
            return None
        return SchemaProcessor(self, schemas)


class SchemaProcessor:
    """One matcher per constrained row of a batch; called by ``generate`` once per token."""

    def __init__(self, grammars: Grammars, schemas: Sequence[str | None]) -> None:
        ll = _llguidance()
        self._ll = ll
        self.matchers: dict[int, Any] = {
            row: ll.LLMatcher(grammars.tokenizer, grammars.grammar(schema))
            for row, schema in enumerate(schemas)
            if schema
        }
        self.eos = set(grammars.eos_ids)
        #: Rows that produced their end-of-sequence token: generation has finished them.
        self.ended: set[int] = set()
        self.bitmask = ll.torch.allocate_token_bitmask(len(schemas), grammars.vocab_size)
        self.executor = grammars.executor
        self._started = False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self._started:  # the last column is the token each row just produced
            last = input_ids[:, -1].tolist()
            for row, matcher in self.matchers.items():
                if row in self.ended:
                    continue
                token = int(last[row])
                if not matcher.consume_token(token):
                    log.warning("row %d left its grammar (%s); it is no longer constrained", row, matcher.get_error())
                if token in self.eos:
                    self.ended.add(row)
        self._started = True
        self.bitmask.fill_(-1)  # every token allowed, unless a live matcher says otherwise
        live = [(m, row) for row, m in self.matchers.items() if row not in self.ended and not m.is_error()]
        if live:  # all rows' masks at once, in native threads (a finished document allows only EOS)
            self._ll.torch.fill_next_token_bitmask_par(self.executor, live, self.bitmask)
        self._ll.torch.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device, non_blocking=True))
        return scores
