"""Configuration of the backends a shard can run on, and the routing rules.

Two kinds of backend, one namespace of names:

- ``GpuPool``: workers running a Hugging Face model (spot GPUs in production, this
  machine embedded). Priced by the hour; throughput is per worker.
- ``ApiProvider``: any OpenAI-compatible HTTP endpoint. Priced per million input
  and output tokens; paced by requests and tokens per minute. The API key is read
  from the environment variable named by ``api_key_env`` when a request is made;
  the key itself is never part of the settings.
- ``ProviderBatchLane``: a provider's batch API (``[api_providers.batch]``), a lane of
  its own called ``<provider>.batch``: the same models at a discount, answered
  within a completion window. Not configured apart: derived from its provider.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "BATCH_LANE_SUFFIX",
    "MESSAGE_OVERHEAD_TOKENS",
    "PROMPT_ROLE",
    "REQUEST_OVERHEAD_TOKENS",
    "ApiProvider",
    "Backend",
    "BatchLane",
    "GpuPool",
    "ProviderBatchLane",
    "RoutingRule",
    "RoutingSettings",
    "Section",
    "default_pools",
    "input_token_bound",
    "reask_token_bound",
    "REASK_ANSWER_BYTES_PER_TOKEN",
    "REASK_NOTE_BYTES",
]

#: Tokens a chat template may add to a request (BOS, a default system prompt such
#: as Qwen's or Llama 3.1's date header, the assistant header) and to each message
#: (role markers, separators). Generous on purpose: they bound what a provider can
#: bill, they do not estimate it.
REQUEST_OVERHEAD_TOKENS = 48
MESSAGE_OVERHEAD_TOKENS = 8


#: The role a row's plain ``prompt`` is sent under: its bytes count in the prompt's bound
#: (a provider may bill the role's tokens), as every message's role does.
PROMPT_ROLE = "user"


def input_token_bound(text_bytes: int, messages: int, requests: int) -> int:
    """The most prompt tokens any tokenizer can make of ``text_bytes`` UTF-8 bytes.

    Byte-level BPE and SentencePiece with byte fallback both emit at least one
    byte per token, so a text never has more tokens than bytes; the chat
    template's own tokens come on top.
    """
    return text_bytes + REQUEST_OVERHEAD_TOKENS * requests + MESSAGE_OVERHEAD_TOKENS * messages


#: A re-ask (an answer that failed its schema, sent back with the reason) carries the
#: answer cut to this many bytes per ``max_tokens`` token, and a note of at most
#: ``REASK_NOTE_BYTES`` bytes: so what each re-ask adds to a request is bounded up front.
REASK_ANSWER_BYTES_PER_TOKEN = 4
REASK_NOTE_BYTES = 400


def reask_token_bound(max_tokens: int) -> int:
    """The most prompt tokens one re-ask adds to a request: the answer, the note, two messages."""
    text = REASK_ANSWER_BYTES_PER_TOKEN * max_tokens + REASK_NOTE_BYTES + len("assistant") + len("user")
    return input_token_bound(text, 2, 0)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _queue_safe(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise ValueError("use letters, digits, '-' and '_' only")
    return value


class GpuPool(Section):
    """A pool of GPU workers."""

    kind: Literal["gpu"] = "gpu"
    name: str
    #: Celery queue its workers consume; default ``gpu.<name>``.
    queue: str = ""
    #: Model ids or local folders served; ``*`` serves any model.
    models: list[str] = Field(default_factory=lambda: ["*"])
    #: Spot price of one worker, USD per hour (0 for hardware already paid for).
    price_per_hour: float = Field(default=0.0, ge=0)
    #: Prior generated tokens per second of one worker, replaced by observation.
    tokens_per_second: float = Field(default=200.0, gt=0)
    max_workers: int = Field(default=1, ge=1)
    #: Expected fraction of shard runs interrupted by a spot reclaim.
    preemption_rate: float = Field(default=0.0, ge=0, le=1)
    #: Longest prompt (tokens) this pool accepts; longer rows go elsewhere.
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    #: ``in_process``: transformers in the worker (``worker.engine`` says how). ``server``:
    #: an OpenAI-compatible inference server beside the worker on the same node (vLLM,
    #: SGLang, TGI as a sidecar) at ``server_url``, kept full of requests.
    engine: Literal["in_process", "server"] = "in_process"
    server_url: str = "http://127.0.0.1:8000/v1"
    #: The most requests in flight to the server; the window adapts below it (AIMD).
    server_max_concurrency: int = Field(default=256, ge=1)
    #: Seconds a worker waits for the server's health (``<server root>/health``) before
    #: it takes a shard; a server that is not up by then leaves the shard queued.
    server_start_seconds: float = Field(default=600.0, gt=0)

    @field_validator("name")
    @classmethod
    def _name_is_queue_safe(cls, value: str) -> str:
        return _queue_safe(value)

    @field_validator("server_url")
    @classmethod
    def _server_http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/@]+", value):
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:8000/v1 (no credentials)")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _default_queue(self) -> GpuPool:
        if not self.queue:
            self.queue = f"gpu.{self.name}"
        return self

    def serves(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def serves_row(self, model: str, job_models: list[str]) -> bool:
        """Whether a row naming its own ``model`` may run here: a model listed by name,
        or, on a ``*`` pool, one of the job's own models (never any folder or hub id
        an input row names)."""
        return model in self.models or ("*" in self.models and model in job_models)

    def provider_model(self, model: str) -> str:
        return model


class BatchLane(Section):
    """A provider's batch API: its models at a discount, answered within a window.

    ``format = "openai"``: Files + Batches as OpenAI defines them (OpenAI, Together,
    Fireworks, vLLM and SGLang servers, ``spotlane serve``). The limits are one
    provider batch's; a shard larger than them is cut, and the rest routed again.
    """

    #: The fraction of the synchronous prices the batch lane bills (0.5: half price).
    discount: float = Field(default=0.5, gt=0, le=1)
    #: The completion window, hours: a provider batch still open after it expires.
    window_hours: float = Field(default=24.0, gt=0, le=24 * 7)
    format: Literal["openai"] = "openai"
    #: The most requests, and bytes of JSONL, in one provider batch.
    max_requests: int = Field(default=50_000, ge=1)
    max_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    #: The most prompt tokens (bounded by bytes) this lane may have enqueued at the
    #: provider at once, all models together (None: no limit).
    max_enqueued_tokens: int | None = Field(default=None, ge=1)
    #: Seconds between looks at an open provider batch.
    poll_seconds: float = Field(default=60.0, gt=0)
    #: A provider batch still open this many minutes before its job's deadline is
    #: cancelled, and its unfinished rows go to another lane.
    fallback_minutes: float = Field(default=60.0, ge=0)
    #: The percentile of observed turnarounds the router plans with (the window until
    #: five provider batches have finished).
    turnaround_percentile: float = Field(default=90.0, gt=0, le=100)


class ApiProvider(Section):
    """An OpenAI-compatible chat-completions endpoint."""

    kind: Literal["api"] = "api"
    name: str
    #: Celery queue its workers consume; default ``api.<name>``.
    queue: str = ""
    #: Base URL up to and including the version, e.g. ``https://api.openai.com/v1``.
    base_url: str
    #: Name of the environment variable holding the API key ("" for no key).
    api_key_env: str = ""
    #: Our model name -> the provider's model name.
    models: dict[str, str] = Field(default_factory=dict)
    input_usd_per_1m: float = Field(default=0.0, ge=0)
    output_usd_per_1m: float = Field(default=0.0, ge=0)
    #: Requests and tokens per minute the account may use (None: unlimited).
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrency: int = Field(default=16, ge=1)
    timeout_seconds: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=6, ge=0)
    #: Prior seconds per request, replaced by observation.
    latency_seconds: float = Field(default=2.0, gt=0)
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    #: Its batch API, a lane of its own (``<name>.batch``); None: it has none.
    batch: BatchLane | None = None

    @field_validator("name")
    @classmethod
    def _name_is_queue_safe(cls, value: str) -> str:
        return _queue_safe(value)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/]+", value):
            raise ValueError("must be an http(s) URL such as https://api.example.com/v1")
        if "@" in value.split("/", 3)[2]:
            raise ValueError("carries credentials; put the key in the environment variable api_key_env names")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _default_queue(self) -> ApiProvider:
        if not self.queue:
            self.queue = f"api.{self.name}"
        return self

    def serves(self, model: str) -> bool:
        return model in self.models

    def serves_row(self, model: str, job_models: list[str]) -> bool:
        return model in self.models

    def provider_model(self, model: str) -> str:
        return self.models[model]

    def api_key(self) -> str | None:
        """The key from the environment, read now (never stored)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def requests_per_second(self, tokens_per_request: float, latency_seconds: float) -> float:
        """Sustainable request rate: the tightest of concurrency, rpm and tpm."""
        limits = [self.max_concurrency / max(latency_seconds, 1e-3)]
        if self.rpm:
            limits.append(self.rpm / 60.0)
        if self.tpm and tokens_per_request > 0:
            limits.append(self.tpm / 60.0 / tokens_per_request)
        return min(limits)


#: A provider's batch lane is named ``<provider><BATCH_LANE_SUFFIX>``.
BATCH_LANE_SUFFIX = ".batch"


@dataclass(frozen=True, eq=False)
class ProviderBatchLane:
    """A provider's batch API as a backend: ``<provider>.batch``, for rules, costs and SQL.

    No worker waits on it: its shards are submitted from the control queue and
    collected by a periodic control task.
    """

    kind: ClassVar[str] = "batch"
    provider: ApiProvider
    #: The control queue: submitting a provider batch takes seconds, not a GPU.
    queue: str

    @property
    def name(self) -> str:
        return self.provider.name + BATCH_LANE_SUFFIX

    @property
    def lane(self) -> BatchLane:
        if self.provider.batch is None:  # pragma: no cover - built only for providers with one
            raise ValueError(f"provider {self.provider.name!r} has no batch lane")
        return self.provider.batch

    @property
    def models(self) -> dict[str, str]:
        return self.provider.models

    @property
    def max_prompt_tokens(self) -> int | None:
        return self.provider.max_prompt_tokens

    def serves(self, model: str) -> bool:
        return self.provider.serves(model)

    def serves_row(self, model: str, job_models: list[str]) -> bool:
        return self.provider.serves_row(model, job_models)

    def provider_model(self, model: str) -> str:
        return self.provider.provider_model(model)


#: Any lane a shard can be routed to.
Backend = GpuPool | ApiProvider | ProviderBatchLane


class RoutingRule(Section):
    """Applied before prices: which backends a matching job may use."""

    #: Match jobs whose tags contain this ``key=value`` (any job if unset).
    tag: str | None = None
    #: Match jobs of this model (any model if unset).
    model: str | None = None
    #: The backends a matching job may use (one name pins it).
    backends: list[str]

    @field_validator("tag")
    @classmethod
    def _key_value(cls, value: str | None) -> str | None:
        if value is not None and "=" not in value:
            raise ValueError("write tags as key=value")
        return value

    def matches(self, model: str, tags: dict[str, object]) -> bool:
        if self.model is not None and self.model != model:
            return False
        if self.tag is not None:
            key, _, want = self.tag.partition("=")
            return str(tags.get(key)) == want
        return True


class RoutingSettings(Section):
    """How the router estimates, learns and falls back."""

    #: Characters per token when no tokenizer is at hand (calibrated by observation).
    chars_per_token: float = Field(default=4.0, gt=0)
    #: Re-asks expected per row with a schema on an API lane (answers that fail the schema
    #: and are asked again), until observed; the estimate counts them, the worst case
    #: every ``schema_retries``.
    reask_rate: float = Field(default=0.1, ge=0)
    #: Weight of a new observation in the moving averages (EWMA).
    ewma_alpha: float = Field(default=0.2, gt=0, le=1)
    #: Shard failures in a row that cool a backend down.
    cooldown_failures: int = Field(default=3, ge=1)
    cooldown_seconds: float = Field(default=300.0, gt=0)
    #: A shard preempted this many times goes back to the router, which re-prices it
    #: with the learnt preemption rate and may move it (to an API provider, say).
    max_preemptions: int = Field(default=3, ge=1)
    rules: list[RoutingRule] = Field(default_factory=list)


def default_pools() -> list[GpuPool]:
    return [GpuPool(name="local")]
