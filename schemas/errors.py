"""The one exception tree of spotlane.

Every error a user can meet is a ``SpotlaneError`` and carries the fields they need
to act on it (the file, column, row or setting at fault). Third-party exceptions are
translated at the boundary with ``raise ... from exc``; the CLI prints ``str(exc)``
as one line (``--debug`` shows the traceback).

    SpotlaneError
    ├── ConfigError          a setting is unknown or has a bad value
    ├── InputError           the input Parquet file is unusable
    ├── ModelError           the model cannot be found or loaded
    ├── StoreError           the job store refused or lost something
    │   ├── NotFound         no job / shard with that id
    │   ├── IllegalMove      a state change the table of moves forbids (a bug)
    │   └── TransientError   storage or the database failed for now; try again
    └── WorkerError          a worker could not run a shard
        ├── LeaseLost        another worker owns the shard now
        ├── InputChanged     the input file is not the one validated at submit
        └── ProviderError    an API provider failed a whole chunk beyond retries

Messages never contain secrets: URLs are rendered through ``schemas.secrets.mask_url``.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "IllegalMove",
    "InputChanged",
    "InputError",
    "LeaseLost",
    "ModelError",
    "NotFound",
    "ProviderError",
    "SpotlaneError",
    "StoreError",
    "TransientError",
    "WorkerError",
]


class SpotlaneError(Exception):
    """Base of every error spotlane raises on purpose."""

    #: CLI exit status for this kind of error (2: the user's input is at fault).
    exit_code: int = 1


class ConfigError(SpotlaneError):
    """A setting is unknown or has a bad value."""

    exit_code = 2

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class InputError(SpotlaneError):
    """The input Parquet file cannot be used; nothing was enqueued."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        row: int | None = None,
        missing: bool = False,
    ) -> None:
        where = ", ".join(
            part
            for part in (
                f"file {file}" if file else "",
                f"column {column!r}" if column else "",
                f"row {row}" if row is not None else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.column = column
        self.row = row
        #: The input is not there at all (a scheduled run may skip rather than fail).
        self.missing = missing


class ModelError(SpotlaneError):
    """The model cannot be found or loaded."""

    exit_code = 2

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message)
        self.model = model


class StoreError(SpotlaneError):
    """The job store refused an operation."""


class NotFound(StoreError):
    """No job or shard has that id."""

    exit_code = 2


class IllegalMove(StoreError):
    """A job or shard state change that ``schemas.status``'s table of moves does not allow."""


class TransientError(StoreError):
    """Object storage or the job store failed in a way that may pass (a 5xx, a dropped
    connection, a full disk); the work is handed back, not failed."""


class WorkerError(SpotlaneError):
    """A worker could not run a shard."""


class LeaseLost(WorkerError):
    """The worker's lease on a shard expired or was taken; it must stop writing."""


class InputChanged(WorkerError):
    """The input file changed (size, mtime or ETag) after the job was submitted."""


class ProviderError(WorkerError):
    """An API provider failed every row of a chunk beyond retries (down, or refusing the key)."""
