"""The settings tree: one TOML file plus ``SPOTLANE_*`` environment variables.

Sources, strongest first: keyword arguments, environment variables
(``SPOTLANE_<SECTION>__<KEY>``), the TOML file (``--config PATH``,
``$SPOTLANE_CONFIG`` or ``./spotlane.toml``), then the defaults documented here.
An unknown key, in the file or the environment, is an error naming it.

With nothing configured every URL points inside the spotlane home folder
(``./.spotlane`` or ``$SPOTLANE_HOME``): a SQLite job store, a filesystem Celery
transport and three local storage tiers. This module reads the environment only
when ``load_settings`` is called, never at import time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from schemas.backends import ApiProvider, Backend, GpuPool, ProviderBatchLane, RoutingSettings, default_pools
from schemas.backends import Section as _Section
from schemas.environment import ENV_PREFIX, config_path, known_env_names, warn_unknown_env
from schemas.errors import ConfigError
from schemas.schedules import Schedule
from schemas.secrets import mask_url

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_HOME",
    "BrokerSettings",
    "CacheSettings",
    "DatabaseSettings",
    "ApiProvider",
    "GpuPool",
    "JobDefaults",
    "MetricsSettings",
    "Schedule",
    "SchedulerSettings",
    "ServeSettings",
    "Settings",
    "StorageSettings",
    "WebhookSettings",
    "WorkerSettings",
    "load_settings",
]

log = logging.getLogger(__name__)

#: Folder of the embedded default, relative to the working folder.
DEFAULT_HOME = ".spotlane"
#: Config file looked for in the working folder when none is named.
DEFAULT_CONFIG_FILE = "spotlane.toml"


class DatabaseSettings(_Section):
    """The job store. Default: ``sqlite:///<home>/spotlane.db``."""

    url: str = ""
    #: Connection pool size for server databases (ignored by SQLite).
    pool_size: int = Field(default=5, ge=1)


class BrokerSettings(_Section):
    """The Celery broker. Default: kombu's filesystem transport under ``<home>/broker``."""

    url: str = ""
    #: Seconds a delivered, unacknowledged task stays invisible before the broker
    #: redelivers it (Redis). Must exceed the longest shard run; the lease reaper
    #: covers the rest.
    visibility_timeout: int = Field(default=3600, ge=60)


#: S3 storage classes whose objects can be read without a restore request.
READABLE_STORAGE_CLASSES = (
    "STANDARD",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER_IR",
    "REDUCED_REDUNDANCY",
)


class StorageSettings(_Section):
    """Three fsspec URLs: ``hot`` (checkpoints), ``warm`` (results), ``cold`` (archive),
    and the lifecycle that moves and deletes what is in them."""

    hot: str = ""
    warm: str = ""
    cold: str = ""
    #: S3 storage class of objects written to each tier ("" = the bucket's default).
    #: Only for ``s3://`` tiers; classes that need a restore before reading
    #: (GLACIER, DEEP_ARCHIVE) are refused: results must stay directly readable.
    hot_storage_class: str = ""
    warm_storage_class: str = ""
    cold_storage_class: str = ""
    #: Results of jobs finished this many days ago move from warm to cold (0 = never).
    cold_after_days: float = Field(default=30.0, ge=0)
    #: Results (every tier) and all other data of jobs finished this many days ago
    #: are deleted (0 = keep forever).
    retention_days: float = Field(default=0.0, ge=0)
    #: Checkpoints and orphan part files of finished jobs are deleted this many hours
    #: after the job ended (a failed or cancelled job can be resumed until then).
    checkpoint_grace_hours: float = Field(default=24.0, ge=0)
    #: Seconds between lifecycle sweeps sent by the scheduler.
    sweep_interval_seconds: float = Field(default=3600.0, gt=0)
    #: A sweep starts no new action after this many seconds; the rest waits for the
    #: next sweep, so routing and finalizing on the control queue are not held up.
    sweep_max_seconds: float = Field(default=600.0, gt=0)
    #: Part files the finalizer reads at once (an object store answers each GET in tens
    #: of milliseconds: one at a time, a 10M-row job's 40,000 parts take half an hour).
    read_concurrency: int = Field(default=16, ge=1, le=256)

    @model_validator(mode="after")
    def _storage_classes(self) -> StorageSettings:
        for tier in ("hot", "warm", "cold"):
            value = getattr(self, f"{tier}_storage_class")
            if not value:
                continue
            if value not in READABLE_STORAGE_CLASSES:
                raise ValueError(
                    f"{tier}_storage_class {value!r} is not one of {', '.join(READABLE_STORAGE_CLASSES)} "
                    "(GLACIER and DEEP_ARCHIVE objects cannot be read without a restore)"
                )
            url = getattr(self, tier)
            if url and not url.startswith(("s3://", "s3a://")):
                raise ValueError(f"{tier}_storage_class is set but storage.{tier} ({url}) is not an s3:// URL")
        if self.retention_days and self.cold_after_days and self.retention_days <= self.cold_after_days:
            raise ValueError(
                f"retention_days ({self.retention_days}) must exceed cold_after_days ({self.cold_after_days}), "
                "or set cold_after_days = 0"
            )
        return self

    def storage_class(self, tier: str) -> str:
        return str(getattr(self, f"{tier}_storage_class"))


class SchedulerSettings(_Section):
    """The scheduler (Celery beat) and the scheduled runs it triggers."""

    #: Seconds between checks for due ``[[schedules]]`` runs.
    tick_seconds: float = Field(default=30.0, gt=0)


class MetricsSettings(_Section):
    """Prometheus metrics."""

    #: Port a worker serves ``/metrics`` on; 0 turns the endpoint off.
    port: int = Field(default=0, ge=0, le=65535)
    #: Address it listens on: loopback unless set (a container sets 0.0.0.0 and
    #: keeps the port private to its network).
    address: str = "127.0.0.1"


class ServeSettings(_Section):
    """``spotlane serve``: the OpenAI Files and Batches API."""

    #: Loopback unless set: a container sets 0.0.0.0 behind its load balancer.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    #: The largest file an upload may be (bytes); OpenAI's limit is 200 MB.
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    #: A batch's default completion window, when the request's is absent.
    completion_window: str = "24h"
    #: Uvicorn worker processes of one replica.
    workers: int = Field(default=1, ge=1)


class WebhookSettings(_Section):
    """A receiver of job events, signed the Standard Webhooks way."""

    name: str
    url: str
    #: Name of the environment variable holding the signing secret (``whsec_`` + base64,
    #: or any text); the secret itself is never part of the settings.
    secret_env: str
    #: Events sent to it; all of them when empty.
    events: list[Literal["batch.completed", "batch.failed", "batch.expired", "batch.cancelled", "job.paused"]] = Field(
        default_factory=list
    )
    #: Attempts before a delivery is given up (each is a row in ``webhook_deliveries``).
    max_attempts: int = Field(default=8, ge=1)
    #: Wait before the second attempt; it doubles with each attempt, to at most an hour.
    backoff_seconds: float = Field(default=5.0, gt=0)
    timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        if "@" in value.split("/", 3)[2]:
            raise ValueError("carries credentials; sign with secret_env instead")
        return value


class CacheSettings(_Section):
    """The answer cache: a row asked before (same fingerprint) is answered for free."""

    #: Jobs use it unless they say ``--no-cache``; ``false`` turns it off for all but
    #: ``--incremental`` jobs and schedules.
    enabled: bool = True
    #: Answers older than this are asked again (and dropped by the storage sweep).
    ttl_days: float = Field(default=30.0, gt=0)


class JobDefaults(_Section):
    """Defaults for a job when the submitter names none."""

    rows_per_shard: int = Field(default=1000, ge=1)
    #: A job that names no shard size and would make more shards than this at
    #: ``rows_per_shard`` gets bigger shards instead (10M rows: 5,000 a shard): one job's
    #: shards are routed one at a time, and each is at least one part for the finalizer.
    max_shards: int = Field(default=2000, ge=1)
    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)


class WorkerSettings(_Section):
    """How workers run shards."""

    #: Rows per part file and checkpoint commit at first, and at least: a fast lane's
    #: parts grow until one holds about ``checkpoint_seconds`` of work (at most
    #: ``checkpoint_max_rows`` rows), the most work a crash can redo.
    checkpoint_rows: int = Field(default=256, ge=1)
    checkpoint_seconds: float = Field(default=10.0, gt=0)
    checkpoint_max_rows: int = Field(default=8192, ge=1)
    #: Seconds a claimed shard stays owned without a heartbeat.
    lease_seconds: float = Field(default=60.0, gt=0)
    #: Seconds between heartbeats; must be well under ``lease_seconds``.
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    #: Seconds between reaper sweeps (expired leases, lost queue messages).
    reap_interval_seconds: float = Field(default=15.0, gt=0)
    #: A shard queued this long is sent again if the broker is missing its message.
    requeue_after_seconds: float = Field(default=120.0, gt=0)
    #: Padded tokens (rows x (longest prompt + max new tokens)) in one micro-batch.
    token_budget: int = Field(default=32768, ge=16)
    #: Upper bound on rows in one micro-batch, whatever the token budget allows.
    max_batch_rows: int = Field(default=64, ge=1)
    #: ``auto`` picks CUDA when present, else CPU; or ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    #: ``auto``: bfloat16 on CUDA, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: ``batched``: spotlane's length-grouped micro-batches; ``continuous``:
    #: transformers' continuous batching (rows join as slots free up); ``stub``: no
    #: model at all, an answer per row at once (``stub_seconds_per_row`` each), to
    #: measure and test the control plane alone.
    engine: Literal["batched", "continuous", "stub"] = "batched"
    stub_seconds_per_row: float = Field(default=0.0, ge=0)
    #: ``torch.compile`` the model's forward (CUDA; first batches are slower).
    compile: bool = False
    #: Spot-interruption notice URL, polled while the worker runs ("" = off). The
    #: AWS default is http://169.254.169.254/latest/meta-data/spot/instance-action:
    #: 404 means no notice, 200 with {"action": ...} means drain now.
    spot_notice_url: str = ""
    spot_notice_interval_seconds: float = Field(default=5.0, gt=0)
    #: After a stop request the worker drains; past this many seconds it exits
    #: regardless (a broker that went away can hold Celery's shutdown forever).
    #: At most one checkpoint of work is lost, as with kill -9.
    shutdown_grace_seconds: float = Field(default=90.0, gt=0)
    #: The finalizer's lease: it renews it as it writes, and a finalizer silent this
    #: long (dead, frozen) is replaced by another (the reaper sends one).
    finalize_grace_seconds: float = Field(default=120.0, gt=0)
    #: A storage or database error while writing or committing a checkpoint is
    #: retried with backoff for this many seconds; then the shard is handed back
    #: (not failed, and not counted against the backend).
    transient_retry_seconds: float = Field(default=60.0, ge=0)
    #: A chunk that makes no progress for ``hang_factor`` times its estimated time,
    #: and at least ``hang_min_seconds``, is a hung engine: the worker stops
    #: heartbeating, hands the shard back, and (``spotlane worker``) exits.
    hang_factor: float = Field(default=10.0, gt=1)
    hang_min_seconds: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _heartbeat_under_lease(self) -> WorkerSettings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be at most half of "
                f"lease_seconds ({self.lease_seconds})"
            )
        if self.reap_interval_seconds > self.lease_seconds:
            raise ValueError(
                f"reap_interval_seconds ({self.reap_interval_seconds}) must not exceed "
                f"lease_seconds ({self.lease_seconds})"
            )
        return self


class Settings(BaseSettings):
    """The whole configuration; see the README for every key."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    home: Path = Path(DEFAULT_HOME)
    #: Queue of the control plane's tasks (routing, finalizing, reaping).
    control_queue: str = "control"
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    jobs: JobDefaults = Field(default_factory=JobDefaults)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    gpu_pools: list[GpuPool] = Field(default_factory=default_pools)
    api_providers: list[ApiProvider] = Field(default_factory=list)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    schedules: list[Schedule] = Field(default_factory=list)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    webhooks: list[WebhookSettings] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _KnownEnv(settings_cls), TomlConfigSettingsSource(settings_cls))

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        home = self.home.expanduser().resolve()
        self.home = home
        if not self.database.url:
            self.database.url = f"sqlite:///{home / 'spotlane.db'}"
        if not self.broker.url:
            self.broker.url = "filesystem://localhost//"  # a host: kombu warns about none
        for tier in ("hot", "warm", "cold"):
            if not getattr(self.storage, tier):
                setattr(self.storage, tier, (home / "storage" / tier).as_uri())
            if urlsplit(getattr(self.storage, tier)).password is not None:
                raise ValueError(
                    f"storage.{tier} carries a password; give storage credentials through the environment "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for S3)"
                )
        tiers = {t: str(getattr(self.storage, t)).rstrip("/") for t in ("hot", "warm", "cold")}
        for a, b in (("hot", "warm"), ("hot", "cold"), ("warm", "cold")):
            x, y = tiers[a], tiers[b]
            if x == y or x.startswith(y + "/") or y.startswith(x + "/"):
                raise ValueError(
                    f"storage.{a} ({x}) and storage.{b} ({y}) must be separate places, neither inside the other: "
                    "the lifecycle moves and deletes each tier's job folders"
                )
        names = [pool.name for pool in self.gpu_pools] + [p.name for p in self.api_providers]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"backend name {duplicated[0]!r} is used twice (gpu_pools and api_providers share names)")
        schedule_names = [s.name for s in self.schedules]
        twice = sorted({n for n in schedule_names if schedule_names.count(n) > 1})
        if twice:
            raise ValueError(f"schedules: the name {twice[0]!r} is used twice")
        known = set(names) | {lane.name for lane in self.batch_lanes}
        for i, rule in enumerate(self.routing.rules):
            unknown = sorted(set(rule.backends) - known)
            if unknown:
                raise ValueError(f"routing.rules[{i}].backends: no backend named {unknown[0]!r}")
        return self

    @property
    def embedded_broker(self) -> bool:
        return self.broker.url.startswith("filesystem://")

    @property
    def broker_folder(self) -> Path:
        return self.home / "broker"

    def pool(self, name: str) -> GpuPool:
        for pool in self.gpu_pools:
            if pool.name == name:
                return pool
        raise ConfigError(f"no GPU pool named {name!r} in gpu_pools", setting="gpu_pools")

    def backend(self, name: str) -> Backend:
        """The GPU pool, API provider or provider batch lane called ``name``."""
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise ConfigError(f"no backend named {name!r} in gpu_pools or api_providers", setting="gpu_pools")

    @property
    def batch_lanes(self) -> list[ProviderBatchLane]:
        """The providers' batch APIs, each a lane ``<provider>.batch`` on the control queue."""
        return [ProviderBatchLane(p, self.control_queue) for p in self.api_providers if p.batch is not None]

    @property
    def backends(self) -> list[Backend]:
        found: list[Backend] = [*self.gpu_pools]
        found.extend(self.api_providers)
        found.extend(self.batch_lanes)
        return found

    @property
    def queues(self) -> list[str]:
        """Every queue a worker that does everything consumes."""
        return list(dict.fromkeys([self.control_queue, *(b.queue for b in self.backends)]))

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, with credentials masked."""
        data = self.model_dump(mode="json")
        data["database"]["url"] = mask_url(data["database"]["url"])
        data["broker"]["url"] = mask_url(data["broker"]["url"])
        for tier in ("hot", "warm", "cold"):
            data["storage"][tier] = mask_url(data["storage"][tier])
        for provider in data["api_providers"]:
            provider["base_url"] = mask_url(provider["base_url"])
        data["worker"]["spot_notice_url"] = mask_url(data["worker"]["spot_notice_url"])
        return data


class _KnownEnv(EnvSettingsSource):
    """The environment, ``SPOTLANE_*`` settings keys only: a variable that is not one (a
    typo, a tool's own) is never read as a setting; ``load_settings`` warns about it."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        known = {name.lower() for name in known_env_names(Settings, ENV_PREFIX)}
        return {k: v for k, v in super()._load_env_vars().items() if not k.startswith(ENV_PREFIX.lower()) or k in known}


def _describe(error: Mapping[str, Any]) -> str:
    loc = ".".join(str(part) for part in error.get("loc", ()))
    if error.get("type") == "extra_forbidden":
        return f"unknown setting {loc!r}"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"setting {loc!r}: {message}" if loc else message


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the settings now: ``config`` file, then the environment, then ``overrides``.

    Raises ``ConfigError`` naming the key at fault.
    """
    environ = os.environ
    warn_unknown_env(environ, known_env_names(Settings, ENV_PREFIX))
    path = config_path(config, environ, DEFAULT_CONFIG_FILE)
    source = f" (in {path})" if path else ""
    cls: type[Settings] = Settings
    if path is not None:
        cls = type(
            "Settings",
            (Settings,),
            {"model_config": SettingsConfigDict(**{**Settings.model_config, "toml_file": path})},
        )
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(
            _describe(exc.errors()[0]) + source,
            setting=".".join(str(p) for p in exc.errors()[0].get("loc", ())),
        ) from None
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
