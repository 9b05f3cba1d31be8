"""Constrained decoding: a model with random weights answers valid JSON on every row."""

from __future__ import annotations

import json
import re
from pathlib import Path

from schemas.inference import Request
from schemas.structured import validate_answer
from workers.engines.hf import HFEngine

TICKET = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["billing", "shipping", "other"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
        "refund_amount": {"type": ["number", "null"]},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["category", "urgency", "refund_amount", "note"],
    "additionalProperties": False,
}
#: A JSON string, or anything that is not a quote: what is left must hold no whitespace.
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"')


def test_a_random_weight_model_answers_valid_json_on_every_row_not_cut_short(tiny_model: Path) -> None:
    engine = HFEngine(str(tiny_model), device="cpu")
    schema = json.dumps(TICKET)
    requests = [
        Request(prompt=f"ticket {i}: the parcel is late", max_tokens=200, temperature=1.0, response_schema=schema)
        for i in range(12)
    ] + [Request(prompt="free text in the same batch", max_tokens=20, temperature=1.0)]

    done = engine.generate(requests)

    constrained = done[:12]
    assert all(c.finish_reason == "stop" for c in constrained), [c.finish_reason for c in constrained]
    for completion in constrained:
        value, error = validate_answer(TICKET, completion.output)
        assert error is None, (completion.output, error)
        assert not re.search(r"\s", _STRINGS.sub("", completion.output or "")), completion.output
    assert done[12].error is None and done[12].output is not None


def test_a_row_cut_by_max_tokens_is_left_incomplete_and_a_bad_row_schema_fails_alone(tiny_model: Path) -> None:
    engine = HFEngine(str(tiny_model), device="cpu")
    cut = Request(prompt="ticket", max_tokens=3, temperature=1.0, response_schema=json.dumps(TICKET))
    bad = Request(
        prompt="ticket", max_tokens=8, response_schema='{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}'
    )

    short, refused = engine.generate([cut, bad])

    assert short.finish_reason == "length" and validate_answer(TICKET, short.output)[1] is not None
    assert refused.error is not None and refused.error.startswith("response_format: the schema cannot be constrained")


def test_the_continuous_engine_runs_constrained_rows_on_the_batched_path(tiny_model: Path) -> None:
    """transformers' continuous batching takes no logits processor: such rows go the batched way
    (only constrained rows here: a continuous manager sizes its cache from free memory)."""
    from workers.engines.hf_continuous import ContinuousHFEngine

    engine = ContinuousHFEngine(str(tiny_model), device="cpu")
    schema = json.dumps({"type": "string", "enum": ["spam", "ham"]})

    done = engine.generate(
        [Request(prompt=f"is this spam? {i}", max_tokens=16, response_schema=schema) for i in range(3)]
    )

    assert all(c.finish_reason == "stop" and c.output in ('"spam"', '"ham"') for c in done)
    assert "_managers" not in engine.__dict__  # no continuous manager was started
