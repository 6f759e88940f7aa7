"""Gather what a report needs from the bucket (and AWS), then build it: the I/O around report.py.

Owns: which runs a report covers, reading each run's ledger and manifests,
and, unless told to stay offline, replacing the start-time price of each
EC2 spot segment with the spot price history over the segment (integrated
over price changes), when the ledger's price was not an override.
"""

from __future__ import annotations

import logging
import time

from runner.checkpoint.reader import RunReader
from runner.cost import pricing
from runner.cost.ledger import ledger_runs, read_events
from runner.cost.report import Report, build_report
from runner.errors import SnapshotNotFoundError
from runner.storage import StorageError, Store

log = logging.getLogger("runner.cost")


def report_runs(store: Store, run_id: str | None = None, *, lookup: bool = True, now: float | None = None,
                price_override: float | None = None, on_demand_override: float | None = None) -> list[Report]:
    """Reports for `run_id`, or for every run under the store with a ledger.

    `price_override` / `on_demand_override` (USD per hour) replace what the
    ledger recorded, for every segment (a ledger recorded without a price);
    with a price override no spot price history is looked up.

    Raises SnapshotNotFoundError when the run has no ledger (or no run has
    one), StorageError when the store fails.
    """
    now = time.time() if now is None else now
    runs = [run_id] if run_id else ledger_runs(store)
    if not runs:
        raise SnapshotNotFoundError(f"no run under {store.url} has a cost ledger; runs started with "
                                    "`runner start` write one under <run>/ledger/")
    reports = []
    for run in runs:
        events = read_events(store, run)
        if not events:
            raise SnapshotNotFoundError(f"run {run} has no cost ledger under {store.url}/{run}/ledger/; "
                                        "check --bucket and --run-id (see `runner ls`)")
        try:
            manifests = list(RunReader(store, run).valid_snapshots())
        except StorageError as exc:
            log.warning("cannot read the snapshots of run %s: %s", run, exc)
            manifests = []
        schedules: dict[str, list[tuple[float, float]]] = {}
        if lookup and price_override is None:
            draft = build_report(run, events, now=now, snapshots=manifests)
            for seg in draft.segments:
                if seg.cloud == "ec2" and seg.lifecycle == "spot" and seg.instance_type and seg.availability_zone \
                        and not pricing.is_override(seg.price_source):  # fmt: skip
                    history = pricing.spot_price_history(seg.instance_type, seg.availability_zone, seg.start,
                                                         seg.end, region=seg.region)
                    if history:
                        schedules[seg.attempt] = history
        reports.append(build_report(run, events, now=now, snapshots=manifests, schedules=schedules,
                                    schedule_source={a: pricing.SRC_SPOT_HISTORY for a in schedules},
                                    price_override=price_override, on_demand_override=on_demand_override))
    return reports
