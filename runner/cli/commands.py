"""One function per `runner` command: build the config, call ops/ (or the supervisor, cost/, sim/), render.

No logic of its own: what a command does lives in the package it calls, how
its result looks in terminal.py.  The supervisor, the simulator and the
rendezvous store are imported only when their command runs (`_load`), so
the read-only commands start fast and a slim installation says what it lacks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from runner import ops
from runner.cli import terminal
from runner.errors import ConfigError
from runner.storage import parse_storage_options

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Unavailable(RuntimeError):
    """A part of runner that this installation lacks."""


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    try:
        return parse_storage_options(args.storage_option or [])
    except ValueError as exc:
        raise ConfigError(f"bad --storage-option: {exc} (e.g. --storage-option endpoint_url=http://host:9000)") from None


# -- handlers: build the config, call operations, render ------------------------------


def _progress(args: argparse.Namespace) -> terminal.ByteProgress:
    return terminal.ByteProgress(enabled=not args.json)


def ls(args: argparse.Namespace) -> int:
    store = ops.open_store(args.bucket, _storage_options(args))
    if args.run_id is None:
        terminal.runs(store.url, ops.list_runs(store), args.json)
    else:
        terminal.snapshots(args.run_id, ops.snapshot_rows(ops.open_run(store, args.run_id)), args.json)
    return EXIT_OK


def verify(args: argparse.Namespace) -> int:
    reader = ops.open_run(ops.open_store(args.bucket, _storage_options(args)), args.run_id)
    selected = ops.select_snapshots(reader, args.snapshot)
    with _progress(args) as progress:
        results = ops.verify(reader, selected, progress)
    terminal.verified(reader.run_id, results, args.json)
    bad = [r for r in results if not r.valid]
    if bad:
        terminal.error(f"{len(bad)} of {len(results)} snapshot(s) of run {reader.run_id} are corrupt; "
                       f"first: {bad[0].snapshot_id}: {'; '.join(bad[0].problems)}")
        return EXIT_FAILED
    return EXIT_OK


def gc(args: argparse.Namespace) -> int:
    reader = ops.open_run(ops.open_store(args.bucket, _storage_options(args)), args.run_id)
    with _progress(args) as progress:
        report = ops.gc(reader, args.keep_last, args.orphan_age, args.dry_run, progress)
    terminal.gc_report(report, args.json)
    return EXIT_OK


def pin(args: argparse.Namespace) -> int:
    reader = ops.open_run(ops.open_store(args.bucket, _storage_options(args)), args.run_id)
    result = ops.unpin(reader, args.snapshot) if args.unpin else ops.pin(reader, args.snapshot)
    terminal.pin_result(result, args.json)
    return EXIT_OK


def fork(args: argparse.Namespace) -> int:
    source_run, source_snapshot = ops.parse_source(args.source)
    ops.check_run_id(args.to)
    store = ops.open_store(args.bucket, _storage_options(args))
    with _progress(args) as progress:
        manifest = ops.fork(store, source_run, source_snapshot, args.to, progress)
    terminal.forked(manifest, args.json)
    return EXIT_OK


def start(args: argparse.Namespace) -> int:
    from runner.supervisor.config import StartConfig

    if not args.train_command:
        raise ConfigError("no training command: put it after --, e.g. runner start --bucket s3://b/runs -- python train.py")
    values = {name: getattr(args, name) for name in (
        "run_id", "save_every_steps", "interruption_mtbf_s", "keep_last", "notice_source", "grace_seconds", "max_restarts",
        "sync_dir", "imds_endpoint", "poll_interval_s", "lease_ttl_s", "restart_backoff_s", "crash_loop_limit",
        "sync_signal", "sync_settle_s", "sync_step_from", "scale_down_group",
        "price_per_hour", "price_label", "on_demand_price_per_hour", "heartbeat_s", "nproc_per_node", "nnodes", "rdzv_endpoint")}
    if args.offline_prices:
        values["price_lookup"] = False
    config = StartConfig(bucket=args.bucket, command=list(args.train_command), storage_options=_storage_options(args),
                         **{k: v for k, v in values.items() if v is not None})
    supervise = load("runner.supervisor.run", "supervise", "the supervisor")
    return int(supervise(config))


def report(args: argparse.Namespace) -> int:
    from runner.cost import collect, render

    if args.run_id is not None:
        ops.check_run_id(args.run_id)
    for flag, value in (("--price-per-hour", args.price_per_hour),
                        ("--on-demand-price-per-hour", args.on_demand_price_per_hour)):
        if value is not None and not value >= 0:
            raise ConfigError(f"{flag} must be a price in USD per hour (0 or more), not {value}")
    store = ops.open_store(args.bucket, _storage_options(args))
    reports = collect.report_runs(store, args.run_id, lookup=not args.offline, price_override=args.price_per_hour,
                                  on_demand_override=args.on_demand_price_per_hour)
    if args.format == "table" and not args.output:
        render.table(reports, terminal.stdout())
        return EXIT_OK
    if args.format == "table":
        text = terminal.render_text(lambda console: render.table(reports, console))
    elif args.format == "json":
        text = render.to_json(reports, single=args.run_id is not None)
    elif args.format == "csv":
        text = render.to_csv(reports)
    else:
        text = render.to_html(reports)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            raise ConfigError(f"cannot write --output {args.output}: {exc.strerror or exc}") from None
        logging.getLogger("runner").info("wrote %s report to %s", args.format, args.output)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def drill(args: argparse.Namespace) -> int:
    from runner.sim import drill as drills

    if not args.train_command:
        raise ConfigError("no training command: put it after --, e.g. runner drill --bucket s3://b/drills -- python train.py")
    config = drills.DrillConfig(
        bucket=args.bucket, command=list(args.train_command), interruptions=args.interruptions, seed=args.seed,
        kinds=drills.parse_kinds(args.kinds), run_prefix=args.run_prefix, storage_options=_storage_options(args),
        save_every_steps=_fixed_interval(args.save_every_steps), ignore=tuple(args.ignore or ()))
    report = drills.run_drill(config)
    terminal.drill_report(report, args.json)
    if report.identical:
        return EXIT_OK
    differ = ", ".join(c.component for c in report.components if not c.identical)
    what = report.problems[0] if report.problems else f"the final states differ ({differ})"
    terminal.error(f"{what}; the instances' output is kept in {report.logs}" if report.logs else what)
    return EXIT_FAILED


def _fixed_interval(text: str | None) -> int | None:
    """`runner drill --save-every-steps`: a number of steps; "auto" is refused (the drill must know the saves)."""
    if text is None:
        return None
    if text.strip().lower() == "auto":
        raise ConfigError("runner drill needs a fixed --save-every-steps N: it plans its kills at the periodic "
                          "saves, which 'auto' places by timing")
    try:
        steps = int(text)
    except ValueError:
        steps = 0
    if steps < 1:
        raise ConfigError(f"invalid --save-every-steps {text!r}: use a number of steps (1 or more)")
    return steps


def demo(args: argparse.Namespace) -> int:
    from runner.sim import demo as story

    config = story.DemoConfig(bucket=args.bucket, steps=args.steps, save_every_steps=args.save_every_steps,
                              step_sleep=args.step_sleep, reference=not args.no_reference)
    return story.run(config, show_snapshots=lambda run_id, rows: terminal.snapshots(run_id, rows, as_json=False),
                     error=terminal.error)


def imds_sim(argv: list[str]) -> int:
    return int(load("runner.sim.imds", "main", "the IMDS simulator")(argv))


def load(module: str, name: str, what: str) -> Any:
    """`module.name`, imported only now; raises Unavailable when this installation lacks it."""
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        loaded = None
    found = getattr(loaded, name, None)
    if found is None:
        raise Unavailable(f"{what} is not available in this installation ({module}.{name} is missing); reinstall runner")
    return found
