"""Pricing a shard on a backend: estimated cost, time, and how many run at once.

GPU pool: time = (output tokens + prefill share of input tokens) / tokens per
second of one worker; cost = that time at the pool's hourly spot price, plus the
expected redo after a preemption (half a checkpoint interval on average, priced as
half a shard at the preemption rate). ``capacity`` is the pool's ``max_workers``.

API provider: cost = tokens at the provider's per-million prices; time = rows at
the sustainable request rate (the tightest of concurrency / latency, rpm, tpm);
``capacity`` 1, since the rate already counts concurrency. Rows that will not be
sent (a repeat of an earlier row, an answer the cache holds: ``profile.answered_rows``)
are left out of the estimate, never out of the worst case. Rows with a schema are
asked again when an answer fails it: the estimate adds the expected re-asks (the
learnt re-ask rate, ``routing.reask_rate`` until observed, at most
``schema_retries`` a row), each priced as the row's prompt grown by its answer and
the note, and answered again.

Provider batch lane (``<provider>.batch``): the provider's token prices times its
``discount``; time is the lane's turnaround (``turnaround``: the learnt high
percentile, the completion window until observed), the same for every shard, since
the provider runs them side by side: a batch quote carries it as ``turnaround`` and
the deadline checks it alone. A row is asked once there (no re-ask inside a
batch): an answer that fails its schema goes back to the router, so its worst
case is one attempt.

Observed figures (``pipeline.routing.observations``) replace the configured priors.

Each quote carries an estimate and bounds. ``cost_usd`` is the estimate (learnt
characters per token and output fill): what ``plan`` shows and what routing
compares. ``reserve_usd`` is the worst case the backend can bill for the shard:
every row's ``max_tokens``, and an input no tokenizer can exceed
(``ShardProfile.input_bound``); ``row_reserve_usd`` the worst case of its
costliest row. The budget holds worst cases chunk by chunk (``pipeline.store.ledger``):
a provider's bill for a chunk cannot exceed what was reserved for it (the API
engine charges no more than each request's bound); a GPU pool's is time and can,
by at most one chunk, which the next chunk's reservation accounts for.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.routing.estimate import ShardProfile
from pipeline.routing.observations import Observed
from schemas.backends import (
    REASK_NOTE_BYTES,
    ApiProvider,
    Backend,
    GpuPool,
    ProviderBatchLane,
    RoutingSettings,
    reask_token_bound,
)

__all__ = ["PREFILL_WEIGHT", "Quote", "api_cost", "quote", "reasked_worst_case_usd", "worst_case_usd"]

#: A prompt token costs a GPU about this fraction of a generated token (prefill is batched).
PREFILL_WEIGHT = 0.1


@dataclass(frozen=True)
class Quote:
    backend: str
    kind: str
    queue: str
    model: str
    cost_usd: float
    #: Seconds of one worker (GPU) or of the provider's sustainable rate (API).
    seconds: float
    capacity: int
    input_tokens: int
    output_tokens: int
    #: The worst case the backend can bill for the whole shard.
    reserve_usd: float = 0.0
    #: The worst case of the shard's costliest row: what starting it needs at least.
    row_reserve_usd: float = 0.0
    #: Rows this lane would not be sent (the answer cache holds them, or they repeat).
    answered_rows: int = 0
    #: A provider batch lane's turnaround, seconds: the shard is done that long after it
    #: is sent, whatever else the lane holds (None: ``seconds`` at ``capacity``, after the backlog).
    turnaround: float | None = None


def quote(
    backend: Backend,
    model: str,
    profile: ShardProfile,
    stats: Observed | None,
    routing: RoutingSettings,
    schema_retries: int = 0,
    turnaround: float | None = None,
) -> Quote | None:
    """The price of ``profile`` on ``backend``; None if the backend refuses the rows.

    ``schema_retries``: an API lane may ask each row with a schema
    (``profile.structured_rows``) again that often; the worst cases hold every
    attempt, the estimate the expected re-asks. ``turnaround``: a batch lane's learnt
    turnaround (None: its window).
    """
    chars_per_token = (stats.chars_per_token if stats and stats.chars_per_token else None) or routing.chars_per_token
    fill = stats.output_fill if stats and stats.output_fill is not None else 1.0
    # Rows answered without being sent (repeats, the answer cache) cost nothing.
    tokens_in = int(profile.input_tokens(chars_per_token) * profile.sent_share)
    tokens_out = int(profile.output_tokens(fill) * profile.sent_share)
    if backend.max_prompt_tokens is not None:
        longest = profile.longest_prompt_chars / chars_per_token
        if longest > backend.max_prompt_tokens:
            return None
    if isinstance(backend, GpuPool):
        tps = (stats.tokens_per_second if stats and stats.tokens_per_second else None) or backend.tokens_per_second
        preemption = stats.preemption_rate if stats and stats.preemption_rate is not None else backend.preemption_rate
        seconds = max(0.0, (tokens_out + PREFILL_WEIGHT * tokens_in) / tps)
        cost = seconds / 3600.0 * backend.price_per_hour * (1.0 + 0.5 * preemption)
        return Quote(
            backend.name,
            "gpu",
            backend.queue,
            model,
            cost,
            seconds * (1.0 + 0.5 * preemption),
            backend.max_workers,
            tokens_in,
            tokens_out,
            reserve_usd=worst_case_usd(backend, profile, stats),
            row_reserve_usd=worst_case_usd(backend, profile.worst_row(), stats),
            answered_rows=profile.answered_rows,
        )
    if isinstance(backend, ProviderBatchLane):
        seconds = turnaround if turnaround is not None else backend.lane.window_hours * 3600.0
        return Quote(
            backend.name,
            "batch",
            backend.queue,
            model,
            max(0.0, api_cost(backend.provider, tokens_in, tokens_out) * backend.lane.discount),
            seconds,
            1,
            tokens_in,
            tokens_out,
            reserve_usd=worst_case_usd(backend, profile),
            row_reserve_usd=worst_case_usd(backend, profile.worst_row()),
            answered_rows=profile.answered_rows,
            turnaround=seconds,
        )
    latency = (stats.latency_seconds if stats and stats.latency_seconds else None) or backend.latency_seconds
    sent_rows = max(profile.rows - profile.answered_rows, 1)
    per_request = (tokens_in + tokens_out) / sent_rows
    rate = backend.requests_per_second(per_request, latency)
    reasks = 0.0
    if schema_retries and profile.structured_rows:
        learnt = stats.reask_rate if stats and stats.reask_rate is not None else routing.reask_rate
        reasks = min(float(schema_retries), learnt) * profile.structured_rows * profile.sent_share
    # A re-ask sends the row's prompt, its answer and a note, and is answered again.
    reask_in = (tokens_in + tokens_out) / sent_rows + REASK_NOTE_BYTES / chars_per_token
    reask_out = tokens_out / sent_rows
    extra_in, extra_out = int(reasks * reask_in), int(reasks * reask_out)
    return Quote(
        backend.name,
        "api",
        backend.queue,
        model,
        max(0.0, api_cost(backend, tokens_in + extra_in, tokens_out + extra_out)),
        (profile.rows - profile.answered_rows + reasks) / rate,
        1,
        tokens_in + extra_in,
        tokens_out + extra_out,
        reserve_usd=_api_worst_case(backend, profile, schema_retries),
        row_reserve_usd=_api_worst_case(backend, profile.worst_row(), schema_retries),
        answered_rows=profile.answered_rows,
    )


def _api_worst_case(provider: ApiProvider, profile: ShardProfile, retries: int) -> float:
    """``worst_case_usd`` on a provider, with every re-ask a row with a schema may take."""
    if not retries:
        return worst_case_usd(provider, profile)
    per_row = profile.largest_max_tokens or profile.max_tokens  # a worst_row profile holds one row's
    grow = reask_token_bound(per_row) * profile.rows
    bound = profile.input_bound(exact_tokenizer=False)
    return max(0.0, sum(api_cost(provider, bound + k * grow, profile.max_tokens) for k in range(retries + 1)))


def api_cost(provider: ApiProvider, input_tokens: int, output_tokens: int) -> float:
    return input_tokens / 1e6 * provider.input_usd_per_1m + output_tokens / 1e6 * provider.output_usd_per_1m


def reasked_worst_case_usd(provider: ApiProvider, input_bound: int, max_tokens: int, retries: int) -> float:
    """The most a provider can bill for one row asked once and re-asked ``retries`` times:
    every attempt's answer, and a prompt that grows by one re-ask each time."""
    grow = reask_token_bound(max_tokens)
    return sum(api_cost(provider, input_bound + k * grow, max_tokens) for k in range(retries + 1))


def worst_case_usd(backend: Backend, profile: ShardProfile, stats: Observed | None = None) -> float:
    """The most ``backend`` can bill for ``profile``'s rows (see the module docstring)."""
    if isinstance(backend, ProviderBatchLane):
        return worst_case_usd(backend.provider, profile) * backend.lane.discount
    if isinstance(backend, ApiProvider):
        # The provider's tokenizer is not ours to know: bound by bytes.
        return max(0.0, api_cost(backend, profile.input_bound(exact_tokenizer=False), profile.max_tokens))
    tps = (stats.tokens_per_second if stats and stats.tokens_per_second else None) or backend.tokens_per_second
    preemption = stats.preemption_rate if stats and stats.preemption_rate is not None else backend.preemption_rate
    seconds = (profile.max_tokens + PREFILL_WEIGHT * profile.input_bound(exact_tokenizer=True)) / tps
    return max(0.0, seconds / 3600.0 * backend.price_per_hour * (1.0 + 0.5 * preemption))
