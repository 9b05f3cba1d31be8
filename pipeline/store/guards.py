"""The checks every state move makes: the table of moves, and how many rows an UPDATE matched."""

from __future__ import annotations

from typing import Any

from schemas.errors import IllegalMove
from schemas.status import JOB_MOVES, SHARD_MOVES, JobStatus, ShardStatus

__all__ = ["check_job_move", "check_shard_move", "matched"]


def check_job_move(expected: tuple[JobStatus, ...], new: JobStatus) -> None:
    for old in expected:
        if new not in JOB_MOVES[old]:
            raise IllegalMove(f"job {old.value} -> {new.value} is not an allowed move")


def check_shard_move(expected: tuple[ShardStatus, ...], new: ShardStatus) -> None:
    for old in expected:
        if new not in SHARD_MOVES[old]:
            raise IllegalMove(f"shard {old.value} -> {new.value} is not an allowed move")


def matched(result: Any) -> int:
    """Rows an UPDATE matched (``rowcount``, which SQLAlchemy's typing hides)."""
    return int(result.rowcount)
