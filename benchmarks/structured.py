"""What a JSON Schema constraint costs the GPU lane, and whether it holds on a weak model.

The engine benchmark's model (a seeded random-weight Llama, built locally), the same
rows three times through spotlane's transformers engine: constrained to a
ticket-extraction schema (llguidance, one matcher per row, masks applied on the device);
then free text in the same batches, each row made to end exactly where its constrained
twin ended (so rows, steps and padding are the same and only the constraint differs:
the target is a constraint costing at most 15% of tokens/s); then free text with each
row's length known up front, which lets the engine group rows of one length (no
constrained job can be batched so; it shows what static batches lose to rows that wait
on their longest). Also reported: the time spent inside the constraint itself (masks
and matchers), and the share of constrained rows that parse and validate against the
schema among those not cut by ``max_tokens`` (target 100%).

The API lane (``--api``): a local OpenAI-compatible server that answers invalid JSON to
a third of the first requests, the same rows with ``schema_retries`` 0 and 2: the share of
rows valid after retries, and what the re-asks cost on top (tokens billed as sent).

    python benchmarks/structured.py [--rows 64] [--max-tokens 192] [--device auto]
    python benchmarks/structured.py --api [--rows 300]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.inference import Request  # noqa: E402
from schemas.structured import validate_answer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["billing", "shipping", "account", "other"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "refund_amount": {"type": ["number", "null"]},
        "summary": {"type": "string", "maxLength": 60},
    },
    "required": ["category", "urgency", "refund_amount", "summary"],
    "additionalProperties": False,
}


def api_lane(rows: int) -> None:
    """Re-asks against a provider that answers invalid JSON a third of the time."""
    import tests.support.openai_server as server_module
    from schemas.backends import ApiProvider
    from schemas.structured import choices_schema
    from workers.engines.chunks import Chunk, merge
    from workers.engines.openai_http import APIEngine

    counter = [0]

    def answer(body: dict[str, Any]) -> dict[str, Any]:
        counter[0] += 1
        content = "spam, probably" if counter[0] % 3 == 0 else json.dumps("ham")
        sent = sum(len(m["content"].encode()) for m in body["messages"])
        return {
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": sent, "completion_tokens": 2, "total_tokens": sent + 2},
        }

    server_module._answer = answer  # type: ignore[assignment]
    schema = json.dumps(choices_schema(["spam", "ham"]))
    import pyarrow as pa

    with server_module.FakeOpenAI() as server:
        api = ApiProvider(name="p", base_url=server.url, models={"m": "m"}, input_usd_per_1m=1.0, output_usd_per_1m=2.0)
        for retries in (0, 2):
            counter[0] = 0
            engine = APIEngine(api, "m")
            requests = [
                Request(
                    prompt=f"Label ticket {i}: spam or ham?",
                    max_tokens=8,
                    response_schema=schema,
                    schema_retries=retries,
                )
                for i in range(rows)
            ]
            try:
                done = engine.generate(requests)
            finally:
                engine.close()
            table = pa.table({"id": [str(i) for i in range(rows)]})
            checked = merge(Chunk(0, table, list(requests), [None] * rows), done)
            valid = sum(c.error is None for c in checked)
            cost = sum(c.cost_usd or 0.0 for c in checked)
            print(
                f"API lane, schema_retries {retries}: {valid} of {rows} rows valid ({100 * valid / rows:.1f}%), "
                f"{counter[0]} requests, ${cost * 1e3:.4f} per 1,000 rows at $1/$2 per 1M tokens"
            )


@contextlib.contextmanager
def same_stops(engine: Any, lengths: list[int], stops: list[bool]) -> Iterator[None]:
    """Within the block, row ``i`` of ``engine.generate`` ends after exactly ``lengths[i]`` tokens.

    A logits processor stands where the schema's would: EOS is forbidden before a row's
    length and forced at it (rows that ran to ``max_tokens`` never get it). It is given
    to every batch through the engine's own hook for a constraint, so the batches are
    planned exactly as for the constrained arm.
    """
    from workers.engines import hf

    torch, _ = hf._import_torch()
    eos = sorted(engine.eos_ids)

    class ForceLengths:
        def __init__(self, rows: list[int]) -> None:
            self.rows, self.step = rows, 0

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            for row, index in enumerate(self.rows):
                if stops[index] and self.step == lengths[index] - 1:
                    keep = scores[row, eos[0]].clone()
                    scores[row, :] = -float("inf")
                    scores[row, eos[0]] = keep if torch.isfinite(keep) else 0.0
                else:
                    scores[row, eos] = -float("inf")
            self.step += 1
            return scores

    real_generate = engine._generate_batch

    def generate_batch(batch: list[Any], prompts: dict[int, list[int]]) -> Any:
        real_processor = engine._grammars.processor
        engine._grammars.processor = lambda _schemas: ForceLengths([it.index for it in batch])
        try:
            marked = [dataclasses.replace(it, schema="same-stops") for it in batch]
            return real_generate(marked, prompts)
        finally:
            engine._grammars.processor = real_processor

    engine._generate_batch = generate_batch
    try:
        yield
    finally:
        del engine._generate_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--api", action="store_true", help="The API lane: re-asks against a provider that errs.")
    args = parser.parse_args()
    if args.api:
        api_lane(args.rows)
        return

    from workers.demo_model import build_tiny_model
    from workers.engines.grammar import SchemaProcessor
    from workers.engines.hf import HFEngine

    with tempfile.TemporaryDirectory() as work:
        path = build_tiny_model(
            Path(work) / "model",
            hidden_size=args.hidden,
            layers=args.layers,
            heads=4,
            vocab_size=2048,
            max_positions=1024,
        )
        engine = HFEngine(str(path), device=args.device)
        prompts = [
            f"Extract the ticket fields. Ticket {i}: my parcel {i} is late and I want a refund."
            for i in range(args.rows)
        ]
        schema = json.dumps(SCHEMA)
        requests = [
            Request(prompt=p, max_tokens=args.max_tokens, temperature=1.0, response_schema=schema) for p in prompts
        ]
        # Warm-up: one whole pass of each arm (the first full-size batches pay for the
        # allocator and thread pools: measured, the first constrained pass ran 40% slower).
        warm = engine.generate(requests)
        with same_stops(engine, [c.output_tokens for c in warm], [c.finish_reason == "stop" for c in warm]):
            engine.generate([Request(prompt=p, max_tokens=args.max_tokens, temperature=1.0) for p in prompts])
        # The constrained arm first; the free arms then generate exactly as many tokens per
        # row (the random model hardly ever ends a free row by itself), so the arms do the
        # same work.
        inside = [0.0]
        real_call = SchemaProcessor.__call__

        def timed(self: SchemaProcessor, input_ids: Any, scores: Any) -> Any:
            began = time.perf_counter()
            try:
                return real_call(self, input_ids, scores)
            finally:
                inside[0] += time.perf_counter() - began

        SchemaProcessor.__call__ = timed  # type: ignore[method-assign]
        started = time.perf_counter()
        constrained = engine.generate(requests)
        schema_s = time.perf_counter() - started
        SchemaProcessor.__call__ = real_call  # type: ignore[method-assign]
        lengths = [max(c.output_tokens, 1) for c in constrained]
        stops = [c.finish_reason == "stop" for c in constrained]
        # Free arm 1, the same batches: the same requests without the schema; each row is
        # made to end exactly where its constrained twin ended (EOS forced at that step,
        # forbidden before), so every batch has the same rows, steps and padding, and only
        # the constraint differs. This is the comparison the target is about.
        started = time.perf_counter()
        with same_stops(engine, lengths, stops):
            same = engine.generate([Request(prompt=p, max_tokens=args.max_tokens, temperature=1.0) for p in prompts])
        same_s = time.perf_counter() - started
        assert [c.output_tokens for c in same] == [c.output_tokens for c in constrained], "forced lengths differ"
        # Free arm 2, lengths known up front: each row asks for exactly its twin's tokens, so
        # the engine groups rows of one length together (no row waits on a longer one). No
        # constrained job can be batched like this; it bounds what free text could reach.
        requests = [Request(prompt=p, max_tokens=n, temperature=1.0) for p, n in zip(prompts, lengths, strict=True)]
        started = time.perf_counter()
        free = engine.generate(requests)
        free_s = time.perf_counter() - started
        schema_tokens, free_tokens = sum(c.output_tokens for c in constrained), sum(c.output_tokens for c in free)
        finished = [c for c in constrained if c.finish_reason == "stop"]
        valid = [c for c in finished if validate_answer(SCHEMA, c.output)[1] is None]
        free_rate, schema_rate, same_rate = free_tokens / free_s, schema_tokens / schema_s, schema_tokens / same_s
        print(f"device {engine.device}, {args.rows} rows, max_tokens {args.max_tokens}, temperature 1.0")
        print(f"with schema:              {schema_rate:8.1f} tokens/s ({schema_tokens} tokens in {schema_s:.2f} s)")
        print(f"free, same batches/stops: {same_rate:8.1f} tokens/s ({schema_tokens} tokens in {same_s:.2f} s)")
        print(f"free, lengths known:      {free_rate:8.1f} tokens/s ({free_tokens} tokens in {free_s:.2f} s)")
        print(
            f"constraint cost (same batches): {100 * (1 - schema_rate / same_rate):.1f}% fewer tokens/s "
            f"(ratio {schema_rate / same_rate:.3f}; target <= 15%)"
        )
        print(f"ratio schema / lengths known: {schema_rate / free_rate:.3f} (static batches wait on their longest row)")
        print(f"inside the constraint: {inside[0]:.2f} s of {schema_s:.2f} s ({100 * inside[0] / schema_s:.1f}%)")
        print(
            f"constrained rows: {len(finished)} of {args.rows} ended before max_tokens; "
            f"{len(valid)} of those valid against the schema ({100 * len(valid) / max(len(finished), 1):.1f}%)"
        )


if __name__ == "__main__":
    main()
