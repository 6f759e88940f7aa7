"""What the operator commands do to a bucket: ls, verify, gc, pin, fork (DESIGN.md 3.1).

Owns the logic behind `runner ls / verify / gc / pin / fork`, as plain
functions over a `Store` and a `RunReader` that return plain dataclasses.
Nothing here parses arguments, prints or imports rich: `cli/` parses,
wires and renders.  Long reads report bytes to a `Progress`.

Layout: common.py (opening, ids, progress, RefusedError), listing.py (ls,
verify), retaining.py (gc, pin, unpin), forking.py (fork).  Each module's
note says why it works the way it does.  Everything public is re-exported
here: `from runner import ops; ops.gc(...)`.

Raises (every public function): ConfigError for malformed input,
SnapshotNotFoundError for a snapshot or run that is not there, RefusedError
when the bucket's state makes the operation unsafe, StorageError from the
store.
"""

from runner.ops.common import (
    LATEST,
    NoProgress,
    Progress,
    RefusedError,
    check_run_id,
    check_snapshot_id,
    open_run,
    open_store,
)
from runner.ops.forking import fork, parse_source
from runner.ops.listing import (
    RunSummary,
    SnapshotRow,
    VerifyResult,
    list_runs,
    run_ids,
    select_snapshots,
    snapshot_rows,
    summarize_run,
    verify,
)
from runner.ops.retaining import GcReport, PinResult, gc, pin, unpin

__all__ = [
    "LATEST", "GcReport", "NoProgress", "PinResult", "Progress", "RefusedError", "RunSummary", "SnapshotRow",
    "VerifyResult", "check_run_id", "check_snapshot_id", "fork", "gc", "list_runs", "open_run", "open_store",
    "parse_source", "pin", "run_ids", "select_snapshots", "snapshot_rows", "summarize_run", "unpin", "verify",
]
