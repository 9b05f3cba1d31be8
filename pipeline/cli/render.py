"""How jobs look in a terminal: the progress bar, the status table, the summary line."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console, Group
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from pipeline.api import JobReport

__all__ = ["job_table", "live_line", "progress_bar", "summary_line"]


def progress_bar(console: Console, total: int) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TextColumn("{task.fields[tokens_s]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def summary_line(report: JobReport, wall_seconds: float) -> str:
    ok = report.rows_done - report.rows_failed
    return (
        f"job {report.job_id} {report.status}: {ok} rows ok, {report.rows_failed} failed"
        f"{'' if report.rows_done == report.rows_total else f', {report.rows_total - report.rows_done} not done'}; "
        f"tokens in {report.input_tokens:,} / out {report.output_tokens:,}; "
        f"cost ${report.cost_usd:.4f}"
        f"{f' ({report.rows_cached:,} rows from the cache, ${report.saved_usd:.4f} saved)' if report.rows_cached else ''}"
        f"; wall {wall_seconds:.1f}s"
    )


def live_line(report: JobReport) -> str:
    """``12.5 rows/s, ETA 16:40 UTC, $0.0123 spent`` (rate over the last minutes)."""
    live = report.live
    if live is None:
        return ""
    eta = f"ETA {live.eta[11:16]} UTC" if live.eta else "ETA unknown"
    return f"{live.rows_per_second:,.1f} rows/s, {eta}, ${live.spent_usd:.4f} spent"


def job_table(report: JobReport, max_shards: int = 50) -> Group:
    head = Table(show_header=False, box=None)
    head.add_column(no_wrap=True)
    head.add_column(overflow="fold")  # ids and URLs wrap, never cut: they are what people copy
    head.add_row("job", report.job_id)
    head.add_row("status", report.status)
    head.add_row(
        "model",
        escape(Path(report.model).name if "/" in report.model and Path(report.model).exists() else report.model),
    )
    head.add_row("input", escape(report.input_url))
    head.add_row(
        "rows", f"{report.rows_done}/{report.rows_total} done ({report.percent_done:.1f}%), {report.rows_failed} failed"
    )
    head.add_row(
        "shards",
        f"{report.shards_done} done, {report.shards_running} running, {report.shards_waiting} waiting, "
        f"{report.shards_failed} failed, of {report.shards_total}",
    )
    head.add_row("tokens", f"in {report.input_tokens:,} / out {report.output_tokens:,}")
    head.add_row("cost", f"${report.cost_usd:.4f}")
    live = report.live
    if live is not None and not report.is_final:
        head.add_row("rate", live_line(report))
        head.add_row(
            "projected",
            f"${live.projected_usd:.4f} (${live.projected_low_usd:.4f}-${live.projected_high_usd:.4f}, "
            f"{'from the rows done' if live.basis == 'observed' else 'the router estimate'})",
        )
        if len(live.by_backend) > 1:
            head.add_row(
                "by backend",
                "; ".join(
                    f"{b.backend} {b.rows_done:,} rows ({b.rows_per_second:,.1f}/s, ${b.spent_usd:.4f})"
                    for b in live.by_backend
                ),
            )
        if live.stalled:
            head.add_row("stalled", Text(live.stalled_reason or "no progress", style="yellow"))
    if report.rows_cached:
        head.add_row("cache", f"{report.rows_cached:,} rows answered without asking; ${report.saved_usd:.4f} saved")
    if report.result_url:
        head.add_row("results", escape(report.result_url))
    if report.error:
        head.add_row("error", Text(report.error, style="red"))
    shards = Table("shard", "status", "rows done", "failed", "backend", "attempts", box=None)
    for shard in report.shards[:max_shards]:
        shards.add_row(
            str(shard["shard"]),
            shard["status"],
            f"{shard['rows_done']}/{shard['rows']}",
            str(shard["rows_failed"]),
            escape(shard["backend"] or "-"),
            str(shard["attempts"]),
        )
    parts: list[Table] = [head, shards]
    if len(report.shards) > max_shards:
        more = Table(show_header=False, box=None)
        more.add_row(f"... {len(report.shards) - max_shards} more shards (--json shows all)")
        parts.append(more)
    return Group(*parts)
