"""What the command line shows: rich tables, JSON for scripts, progress bars, log lines.

Owns every byte the CLI writes.  Tables and JSON go to stdout; logs, errors
and progress bars go to stderr, so `runner ls --json | jq` always parses.
The JSON field names are a public interface (DESIGN.md 3.1): snake_case,
stable, extended rather than renamed.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.filesize import decimal
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from runner.checkpoint.manifest import Manifest
from runner.ops import GcReport, PinResult, RunSummary, SnapshotRow, VerifyResult

if TYPE_CHECKING:
    from runner.sim.drill import DrillReport

PREFIX = "runner"


# -- plumbing ---------------------------------------------------------------


def stdout() -> Console:
    """A console on stdout; wide when piped, so ids are never cut."""
    console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 200
    return console


def render_text(draw: Any) -> str:
    """What `draw(console)` prints, as plain text (for --output FILE)."""
    console = Console(file=io.StringIO(), highlight=False, soft_wrap=True, width=200, color_system=None)
    draw(console)
    return console.file.getvalue()  # type: ignore[attr-defined]


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")
    sys.stdout.flush()


def error(message: str) -> None:
    """One line on stderr: `runner: error: ...`."""
    print(f"{PREFIX}: error: {one_line(message)}", file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time, so that a live progress bar,
    which redirects stderr while it runs, prints log lines above itself."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        return f"{PREFIX}: {level}{one_line(record.getMessage())}"


@contextmanager
def logging_to_stderr(level: int) -> Iterator[None]:
    """Route the `runner` logger to the current stderr while a command runs."""
    logger = logging.getLogger("runner")
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


class ByteProgress:
    """`operations.Progress` as a transient rich bar on stderr, shown only when stderr is a terminal."""

    def __init__(self, enabled: bool = True):
        console = Console(file=sys.stderr)
        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=console, transient=True, disable=not (enabled and console.is_terminal),
        )
        self._task: Any = None

    def __enter__(self) -> "ByteProgress":
        self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.stop()

    def begin(self, description: str, total: int) -> None:
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._bar.advance(self._task, n)


# -- formatting -------------------------------------------------------------


def size(n: int | None) -> str:
    return "-" if n is None else decimal(n)


def ago(when: dt.datetime | None, now: dt.datetime | None = None) -> str:
    if when is None:
        return "-"
    seconds = ((now or dt.datetime.now(dt.timezone.utc)) - when).total_seconds()
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{int(seconds // span)} {unit} ago"
    return "just now" if seconds < 5 else f"{int(seconds)} s ago"


def _yes(flag: bool) -> str:
    return "yes" if flag else ""


# -- renderers ---------------------------------------------------------------


def runs(url: str, summaries: list[RunSummary], as_json: bool) -> None:
    if as_json:
        print_json([s.to_json() for s in summaries])
        return
    console = stdout()
    if not summaries:
        console.print(f"no runs under {url}", markup=False)
        return
    table = Table("RUN", "SNAPSHOTS", "VALID", "PINNED", "NEWEST STEP", "NEWEST SNAPSHOT", "UPDATED", "FINISHED",
                  title=url, title_justify="left")
    for s in summaries:
        table.add_row(s.run_id, str(s.snapshots), str(s.valid), str(s.pinned),
                      "-" if s.newest_step is None else str(s.newest_step), s.newest_snapshot_id or "-",
                      ago(s.newest_created_at), _yes(s.final))
    console.print(table)


def snapshots(run_id: str, rows: list[SnapshotRow], as_json: bool) -> None:
    if as_json:
        print_json([r.to_json() for r in rows])
        return
    console = stdout()
    if not rows:
        console.print(f"run {run_id} has no snapshots", markup=False)
        return
    table = Table("SNAPSHOT", "STEP", "EPOCH", "REASON", "CREATED", "SIZE", "FILES", "VALID", "PINNED", "FROM",
                  title=f"run {run_id}", title_justify="left")
    for r in rows:
        lineage = f"fork of {r.forked_from}" if r.forked_from else (r.parent or "-")
        table.add_row(r.snapshot_id, str(r.step), _dash(r.epoch), r.reason or "-", ago(r.created_at),
                      size(r.size_bytes), _dash(r.files), "yes" if r.valid else escape(f"NO: {r.problem}"),
                      _yes(r.pinned), lineage)
    console.print(table)


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def verified(run_id: str, results: list[VerifyResult], as_json: bool) -> None:
    if as_json:
        print_json({"run_id": run_id, "valid": all(r.valid for r in results),
                    "snapshots": [r.to_json() for r in results]})
        return
    table = Table("SNAPSHOT", "STEP", "SIZE", "RESULT", title=f"run {run_id}: deep check", title_justify="left")
    for r in results:
        table.add_row(r.snapshot_id, str(r.step), size(r.size_bytes), "ok" if r.valid else escape("; ".join(r.problems)))
    stdout().print(table)


def gc_report(report: GcReport, as_json: bool) -> None:
    if as_json:
        print_json(report.to_json())
        return
    verb = "would delete" if report.dry_run else "deleted"
    lines = [f"{verb} snapshot {m.snapshot_id} (step {m.step}, {size(m.total_bytes)})" for m in report.deleted]
    lines += [f"{verb} orphaned data {sid} (no manifest)" for sid in report.orphans]
    lines += [f"left alone: {sid} is invalid ({why})" for sid, why in report.invalid.items()]
    lines.append(f"kept {len(report.kept)} valid snapshot(s)"
                 + (f", {len(report.pinned)} pinned" if report.pinned else "")
                 + (f"; newest {report.kept[0]}" if report.kept else ""))
    if report.aborted_uploads:
        lines.append(f"aborted {report.aborted_uploads} stale multipart upload(s)")
    if report.dry_run:
        lines.append("dry run: nothing was deleted")
    console = stdout()
    for line in lines:
        console.print(line, markup=False)


def pin_result(result: PinResult, as_json: bool) -> None:
    if as_json:
        print_json(result.to_json())
        return
    state = "pinned" if result.pinned else "unpinned"
    note = "" if result.changed else f" (was already {state})"
    stdout().print(f"{state} {result.snapshot_id}{note}", markup=False)


def forked(manifest: Manifest, as_json: bool) -> None:
    if as_json:
        print_json({"run_id": manifest.run_id, "snapshot_id": manifest.snapshot_id, "step": manifest.step,
                    "forked_from": manifest.forked_from, "size_bytes": manifest.total_bytes})
        return
    stdout().print(f"forked {manifest.forked_from} into run {manifest.run_id} as {manifest.snapshot_id} "
                   f"(step {manifest.step}, {size(manifest.total_bytes)})", markup=False)


def drill_report(report: "DrillReport", as_json: bool) -> None:
    """`runner drill`'s result: the interruptions, the component comparison, the verdict."""
    if as_json:
        print_json(report.to_json())
        return
    console = stdout()
    ref, run = report.reference, report.interrupted
    table = Table("#", "KIND", "AIMED AT", "HIT AT STEP", "EMERGENCY SNAPSHOT", "RESUMED FROM", "STEPS REDONE",
                  "EXIT", "STOP", "RESUME", "NOTE", title=f"run {run.run_id}: interruptions", title_justify="left")
    for i in report.interruptions:
        table.add_row(str(i.index), i.kind, str(i.planned_step), _dash(i.at_step),
                      "-" if i.emergency_step is None else f"step {i.emergency_step}", _dash(i.resumed_from),
                      _dash(i.steps_lost), _dash(i.exit_code), _seconds(i.stop_seconds), _seconds(i.resume_seconds),
                      escape(i.note))
    if report.interruptions:
        console.print(table)
    if report.components:
        table = Table("COMPONENT", "REFERENCE SHA-256", "INTERRUPTED SHA-256", "RESULT",
                      title="final snapshots, file by file", title_justify="left")
        for c in report.components:
            result = c.result if c.identical else f"[bold red]{c.result.upper()}[/]: {escape(c.detail)}"
            table.add_row(c.component, (c.reference_sha256 or "-")[:16], (c.interrupted_sha256 or "-")[:16], result)
        console.print(table)
    happened = sum(i.happened for i in report.interruptions)
    lines = [
        f"reference:   run {ref.run_id}, " + (f"finished at step {ref.final_step} in {ref.seconds:.1f} s"
                                              f" (first step {_seconds(ref.first_step_seconds)} after the start)"
                                              if ref.final_step is not None else "did not finish"),
        f"interrupted: run {run.run_id}, {run.attempts} instance(s), {happened} of {len(report.interruptions)} "
        f"interruption(s) happened, {report.steps_lost} step(s) redone, "
        + (f"finished at step {run.final_step} in {run.seconds:.1f} s" if run.final_step is not None
           else "did not finish"),
    ]
    for line in lines:
        console.print(line, markup=False)
    if report.identical:
        console.print(f"final state: [bold green]IDENTICAL[/] ({len(report.components)} component files, bitwise)")
    else:
        differ = [c.component for c in report.components if not c.identical]
        verb = "differs" if len(differ) == 1 else "differ"
        why = f": {', '.join(differ)} {verb}" if differ else (": the drill did not complete" if report.problems else "")
        console.print(f"final state: [bold red]NOT IDENTICAL[/]{escape(why)}")
    console.print(f"seed {report.seed} (--seed {report.seed} replays this plan)", markup=False)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"
