"""What a job asks for, defined once: its models, task, limits, money, time and tags.

``JobOptions`` holds what every way of making a job shares, validated once;
``JobSpec`` adds an absolute deadline and is what the CLI, the Python API, plan
and submit pass around; a ``[[schedules]]`` entry (``schemas.schedules``) takes
the same options with a deadline relative to each run. A value out of range is
refused naming the option the way the caller wrote it: ``--max-tokens`` on the
command line, ``schedules.0.max_tokens`` in the config file.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.errors import InputError
from schemas.structured import load_schema

__all__ = ["OPTION_NAMES", "TASKS", "JobOptions", "JobSpec"]

#: What a job does with each row: completions, or pooled sentence embeddings.
TASKS = ("generate", "embed")

#: Each field as the command line spells it.
OPTION_NAMES = {
    "model": "--model",
    "task": "--task",
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "rows_per_shard": "--rows-per-shard",
    "budget_usd": "--budget",
    "deadline": "--deadline",
    "tags": "--tag",
    "response_schema": "--schema",
    "schema_retries": "--schema-retries",
    "use_cache": "--no-cache",
    "refresh_cache": "--refresh",
    "incremental": "--incremental",
}


class JobOptions(BaseModel):
    """A job's parameters besides its input and its deadline."""

    model_config = ConfigDict(extra="forbid")

    #: The model, or several acceptable models (the router picks per shard, cheapest first).
    model: str | list[str]
    #: "generate" (completions) or "embed" (pooled sentence embeddings).
    task: str = "generate"
    #: Default max new tokens per row (a row's own ``max_tokens`` wins). None: the configured default.
    max_tokens: int | None = None
    #: Default sampling temperature, 0 to 5 (0: greedy).
    temperature: float | None = None
    #: Rows per shard. None: ``jobs.rows_per_shard``.
    rows_per_shard: int | None = None
    #: Hard budget in USD: provider-billed spend never exceeds it. None: no budget.
    budget_usd: float | None = None
    #: key=value labels (routing rules, ``costs --by tag``).
    tags: dict[str, Any] = Field(default_factory=dict)
    #: The JSON Schema every answer must follow (a dict, JSON text or a Pydantic model
    #: class; ``schemas.structured``). None: free text.
    response_schema: dict[str, Any] | None = Field(
        default=None, validation_alias=AliasChoices("response_schema", "schema")
    )
    #: How often an API lane re-asks, with the validation error, for an answer that fails
    #: the schema (each attempt is paid for, reserved and counted).
    schema_retries: int = 2
    #: Rows asked before are answered from the answer cache, and this job's answers fill it
    #: (``[cache] enabled`` must be on, unless ``incremental``).
    use_cache: bool = Field(default=True, validation_alias=AliasChoices("use_cache", "cache"))
    #: Ask again what the cache holds, and replace it.
    refresh_cache: bool = Field(default=False, validation_alias=AliasChoices("refresh_cache", "refresh"))
    #: Ask only what was not answered before, whatever ``[cache] enabled`` says (nightly
    #: runs of a growing table); the results still hold every row.
    incremental: bool = False

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | list[str]) -> str | list[str]:
        # An empty list: the input names its models (an OpenAI batch JSONL file's lines).
        if any(not m.strip() for m in ([value] if isinstance(value, str) else value)):
            raise ValueError("names no model")
        return value

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        if value not in TASKS:
            raise ValueError(f"must be generate or embed, not {value!r}")
        return value

    @field_validator("max_tokens", "rows_per_shard")
    @classmethod
    def _at_least_one(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 5.0:  # NaN fails both comparisons
            raise ValueError(f"must be a number in [0, 5], not {value}")
        return value

    @field_validator("budget_usd")
    @classmethod
    def _budget(cls, value: float | None) -> float | None:
        if value is not None and (math.isnan(value) or value < 0):
            raise ValueError(f"must be a number of USD, not negative (got {value})")
        return value

    @field_validator("response_schema", mode="before")
    @classmethod
    def _schema(cls, value: Any) -> Any:
        if value is None:
            return None
        try:
            return load_schema(value, option="")
        except InputError as exc:
            raise ValueError(str(exc).removeprefix(": ")) from None

    @field_validator("schema_retries")
    @classmethod
    def _retries(cls, value: int) -> int:
        if not 0 <= value <= 10:
            raise ValueError(f"must be 0 to 10, not {value}")
        return value

    @model_validator(mode="after")
    def _embeddings_have_no_schema(self) -> JobOptions:
        if self.task == "embed" and self.response_schema is not None:
            raise ValueError("an embedding job takes no schema (--schema or --choices)")
        return self

    @property
    def models(self) -> list[str]:
        return [self.model] if isinstance(self.model, str) else list(self.model)


class JobSpec(JobOptions):
    """One job's parameters, as submit and plan take them. Built from keywords;
    ``InputError`` (exit 2) names the option at fault."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Finish by (UTC); None: no deadline. ``schemas.deadline`` parses what people write.
    deadline: datetime | None = None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0]) if error.get("loc") else ""
            message = str(error.get("msg", "is not valid")).removeprefix("Value error, ")
            raise InputError(f"{OPTION_NAMES.get(field, field)} {message}".strip()) from None

    def options(self) -> dict[str, Any]:
        """The fields as keywords (what ``submit`` and ``plan`` take)."""
        return {name: getattr(self, name) for name in type(self).model_fields}
