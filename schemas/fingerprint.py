"""A request's fingerprint: everything that decides its answer, hashed.

Two rows with the same fingerprint get the same answer: the prompt, or every field
of every message, exactly as they are sent (no whitespace or Unicode folding: for a
raw completion a trailing space changes the answer), the identity of the model on
its lane (``pipeline.jobs.models.lane_identity``: a local folder by its files' contents,
a provider's own model name at its URL), the task, ``max_tokens`` and the JSON Schema
with its re-asks. Rows sampled at a temperature above 0 get none: spotlane takes no
seed, so two of them are two different questions.
"""

from __future__ import annotations

import hashlib
import json

from schemas.inference import Request

__all__ = ["FINGERPRINT_VERSION", "fingerprint"]

#: Part of every fingerprint: a change to what goes in makes every old one a miss.
FINGERPRINT_VERSION = 2


def fingerprint(request: Request, model_identity: str, task: str) -> str | None:
    """The hex SHA-256 fingerprint of ``request`` on the model ``model_identity``; None
    for a row that must not share its answer (sampled above temperature 0)."""
    if request.temperature > 0:
        return None
    asked: object
    if request.messages is not None:
        asked = [sorted(m.items()) for m in request.messages]
    else:
        asked = request.prompt or ""
    key = [
        FINGERPRINT_VERSION,
        model_identity,
        task,
        asked,
        request.max_tokens if task != "embed" else 0,
        request.response_schema,
        request.schema_retries if request.response_schema is not None else 0,
    ]
    return hashlib.sha256(json.dumps(key, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
