"""The `runner` argument parser: every command's flags and their `RUNNER_<FLAG>` environment defaults.

Owns what the command line accepts (DESIGN.md 3.1) and its help text; each
subcommand's handler is a function of commands.py, set as its default.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from typing import Any

from runner.checkpoint.retention import DEFAULT_ORPHAN_AGE_S
from runner.checkpoint.settings import CheckpointSettings
from runner.cli import commands
from runner.errors import ConfigError

EXIT_CODES = """\
exit codes:
  0  success
  1  failure: the store failed or refused (missing bucket, unreachable endpoint,
     missing or wrong credentials), a snapshot or run is not there, verify
     found corruption, or an operation would be unsafe
  2  bad usage or configuration: unknown flag, malformed value, invalid run or
     snapshot id, bad --storage-option, unknown URL scheme (or its fsspec
     backend is not installed)
  runner start: 75 preempted after an emergency checkpoint (resume elsewhere);
     76 another node of a multi-node job was preempted: the job saved and
     stopped, this node is fine (start again here)

Every flag also reads its default from RUNNER_<FLAG> (RUNNER_BUCKET,
RUNNER_RUN_ID, RUNNER_KEEP_LAST, ...); RUNNER_STORAGE_OPTION holds KEY=VALUE
pairs separated by spaces or commas, and --storage-option adds to them."""


# -- environment defaults -----------------------------------------------------


def env_name(flag: str) -> str:
    """`keep_last` -> `RUNNER_KEEP_LAST`."""
    return f"RUNNER_{flag.upper()}"


def add_flag(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """`add_argument` whose default comes from RUNNER_<FLAG> when that is set."""
    name = env_name(flags[0].lstrip("-").replace("-", "_"))
    raw = os.environ.get(name, "").strip()
    if raw:
        kwargs["default"] = _from_env(name, raw, kwargs.get("action"))
        kwargs.pop("required", None)
    kwargs["help"] = f"{kwargs.get('help', '')} [env {name}]".strip()
    parser.add_argument(*flags, **kwargs)


def _from_env(name: str, raw: str, action: str | None) -> Any:
    if action == "store_true":
        if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"{name}={raw!r} is not a boolean: use 1/true/yes or 0/false/no")
        return raw.lower() in ("1", "true", "yes", "on")
    if action == "append":
        return [p for p in re.split(r"[\s,]+", raw) if p]
    return raw  # argparse converts string defaults with the flag's type


# -- the parser -----------------------------------------------------------------


def _common(json_flag: bool = True) -> argparse.ArgumentParser:
    """The flags every bucket command takes."""
    parent = argparse.ArgumentParser(add_help=False)
    add_flag(parent, "--bucket", required=True, metavar="URL",
             help="where runs live: s3://bucket/prefix, oss://..., gs://..., file:///path or a local path")
    add_flag(parent, "--storage-option", action="append", metavar="KEY=VALUE",
             help="an fsspec option, repeatable (e.g. endpoint_url=http://minio:9000)")
    add_flag(parent, "--quiet", "-q", action="store_true", help="log warnings and errors only")
    if json_flag:
        add_flag(parent, "--json", action="store_true", help="print JSON for scripts (stable field names)")
    return parent


def _command(sub: Any, name: str, summary: str, example: str, handler: Callable[[argparse.Namespace], int],
             parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=summary, description=summary, parents=parents,
                            epilog=f"example:\n  {example}\n\n{EXIT_CODES}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Raises ConfigError when a RUNNER_* variable holds a malformed boolean."""
    parser = argparse.ArgumentParser(
        prog="runner", description="Spot-instance-aware training runner for PyTorch.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_start(sub)
    _add_ls(sub)
    _add_verify(sub)
    _add_gc(sub)
    _add_pin(sub)
    _add_fork(sub)
    _add_report(sub)
    _add_drill(sub)
    _add_demo(sub)
    sub.add_parser("rendezvous", help="host the rendezvous store of multi-node torchrun jobs (docs/multi-node.md)",
                   description="Serve torchrun's c10d rendezvous store (see `runner rendezvous --help`).",
                   add_help=False)
    sub.add_parser("imds-sim", help="serve a local EC2 metadata service that simulates spot notices",
                   description="Serve a local EC2 IMDSv2 (see `runner imds-sim --help`).", add_help=False)
    return parser


def _run_command(sub: Any, name: str, summary: str, example: str,
                 handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """A command on one run of a bucket: the common flags and --run-id (default: "default")."""
    parser = _command(sub, name, summary, example, handler, [_common()])
    add_flag(parser, "--run-id", default="default", metavar="ID", help="the run (default: %(default)s)")
    return parser


def _add_ls(sub: Any) -> None:
    p = _command(sub, "ls", "List the runs in a bucket, or the snapshots of one run.",
                 "runner ls --bucket s3://my-bucket/runs --run-id exp1", commands.ls, [_common()])
    add_flag(p, "--run-id", metavar="ID", help="list this run's snapshots (default: list the runs)")


def _add_verify(sub: Any) -> None:
    p = _run_command(sub, "verify", "Read every byte of a run's snapshots and check their SHA-256.",
                     "runner verify --bucket s3://my-bucket/runs --run-id exp1 --snapshot latest", commands.verify)
    add_flag(p, "--snapshot", metavar="ID", help="a snapshot id or 'latest' (default: every snapshot)")


def _add_gc(sub: Any) -> None:
    p = _run_command(sub, "gc", "Delete old snapshots, orphaned data and stale uploads; keeps the newest valid and pinned.",
                     "runner gc --bucket s3://my-bucket/runs --run-id exp1 --keep-last 3 --dry-run", commands.gc)
    add_flag(p, "--keep-last", type=int, default=CheckpointSettings.model_fields["keep_last"].default, metavar="K",
             help="valid snapshots to keep (default: %(default)s)")
    add_flag(p, "--orphan-age", type=float, default=DEFAULT_ORPHAN_AGE_S, metavar="SECONDS",
             help="delete data without a manifest, and multipart uploads, older than this (default: %(default)s)")
    add_flag(p, "--dry-run", action="store_true", help="show what would be deleted; delete nothing")


def _add_pin(sub: Any) -> None:
    p = _run_command(sub, "pin", "Keep a snapshot out of rotation (or let it rotate again with --unpin).",
                     "runner pin --bucket s3://my-bucket/runs --run-id exp1 latest", commands.pin)
    add_flag(p, "--unpin", action="store_true", help="remove the pin instead")
    p.add_argument("snapshot", metavar="SNAPSHOT", help="a snapshot id or 'latest'")


def _add_fork(sub: Any) -> None:
    p = _command(sub, "fork", "Copy a verified snapshot into a new run, which resumes from it.",
                 "runner fork --bucket s3://my-bucket/runs --from exp1@latest --to exp1-lowlr", commands.fork, [_common()])
    add_flag(p, "--from", dest="source", required=True, metavar="RUN[@SNAPSHOT]",
             help="the run, and optionally the snapshot id or 'latest' (default: newest valid)")
    add_flag(p, "--to", dest="to", required=True, metavar="NEW_RUN", help="a run id with no snapshots yet")


def _add_start(sub: Any) -> None:
    from runner.supervisor.config import StartConfig

    def default(name: str) -> str:
        return f"(default: {StartConfig.model_fields[name].default})"

    p = _command(sub, "start", "Run a training command under the supervisor: resume, emergency saves, restarts.",
                 "runner start --bucket s3://my-bucket/runs --run-id exp1 -- python train.py --lr 3e-4",
                 commands.start, [_common(json_flag=False)])
    add_flag(p, "--run-id", metavar="ID", help=default("run_id"))
    add_flag(p, "--save-every-steps", metavar="N|auto",
             help=f"periodic save interval in steps, or auto: chosen from the measured save cost and the run's "
                  f"interruption rate (Young/Daly, at most 3.5%% overhead) {default('save_every_steps')}")
    add_flag(p, "--interruption-mtbf", dest="interruption_mtbf_s", type=float, metavar="S",
             help="with --save-every-steps auto: mean seconds between interruptions (default: from this run's "
                  "ledger, blended with a 6 h prior)")
    add_flag(p, "--keep-last", type=int, metavar="K", help=f"valid snapshots to keep {default('keep_last')}")
    add_flag(p, "--notice-source", metavar="auto|ec2|alibaba|gcp|none", help=default("notice_source"))
    add_flag(p, "--grace-seconds", type=float, metavar="S",
             help=f"time to save after a bare SIGTERM {default('grace_seconds')}")
    add_flag(p, "--max-restarts", type=int, metavar="R", help=f"restarts of a crashed child {default('max_restarts')}")
    add_flag(p, "--sync-dir", metavar="DIR", help="sync this folder as snapshots (for scripts that save on their own)")
    add_flag(p, "--imds-endpoint", metavar="URL", help="the EC2 metadata endpoint (default: the real one)")
    add_flag(p, "--poll-interval", dest="poll_interval_s", type=float, metavar="S",
             help=f"seconds between polls of the cloud's notice endpoint {default('poll_interval_s')}")
    add_flag(p, "--lease-ttl", dest="lease_ttl_s", type=float, metavar="S",
             help=f"seconds the run's lease lasts without renewal; a replacement waits at most this long after "
                  f"an instance vanished {default('lease_ttl_s')}")
    add_flag(p, "--restart-backoff", dest="restart_backoff_s", type=float, metavar="S",
             help=f"first restart delay after a crash; doubles per crash {default('restart_backoff_s')}")
    add_flag(p, "--crash-loop-limit", type=int, metavar="N",
             help=f"crashes in a row without progress that stop the run {default('crash_loop_limit')}")
    add_flag(p, "--sync-signal", metavar="SIG",
             help=f"with --sync-dir: the signal that stops the child after the last sync {default('sync_signal')}")
    add_flag(p, "--sync-settle", dest="sync_settle_s", type=float, metavar="S",
             help=f"with --sync-dir: seconds a file must stay unchanged before it is synced {default('sync_settle_s')}")
    add_flag(p, "--sync-step-from", metavar="KEY|REGEX",
             help="with --sync-dir: the training step of a snapshot, from a key inside its torch checkpoint "
                  "(e.g. iter_num) or a regex with one group over file paths (default: a number in the newest "
                  "checkpoint's file or checkpoint-N folder name, else its iter_num/global_step/step key)")
    add_flag(p, "--scale-down-group", metavar="NAME",
             help="the EC2 Auto Scaling group to scale to zero when the run is finished (exit 0)")
    add_flag(p, "--price-per-hour", type=float, metavar="USD",
             help="what this instance costs per hour, for the cost ledger (default: from EC2 / the bundled table)")
    add_flag(p, "--price-label", metavar="TEXT",
             help="where --price-per-hour comes from, shown beside it in reports (e.g. 'spot, us-east-1a, 2026-12')")
    add_flag(p, "--on-demand-price-per-hour", type=float, metavar="USD",
             help="the on-demand price to compare with (default: the AWS Pricing API / the bundled table)")
    add_flag(p, "--offline-prices", action="store_true",
             help="do not ask EC2 / the AWS Pricing API for prices: overrides and the bundled table only")
    add_flag(p, "--heartbeat", dest="heartbeat_s", type=float, metavar="S",
             help=f"seconds between cost-ledger heartbeats {default('heartbeat_s')}")
    torchrun = p.add_argument_group("torchrun (docs/multi-node.md): runner builds the torchrun command around "
                                    "`python SCRIPT ARGS`")
    add_flag(torchrun, "--nproc-per-node", type=int, metavar="N", help="ranks on this machine, one per GPU")
    add_flag(torchrun, "--nnodes", metavar="N|MIN:MAX", help="machines in the job (default: 1)")
    add_flag(torchrun, "--rdzv-endpoint", metavar="HOST[:PORT]",
             help="where the nodes meet: a `runner rendezvous` store that outlives them (needed with --nnodes > 1)")
    p.add_argument("train_command", nargs="*", metavar="COMMAND", help="the training command and its arguments, after --")


def _add_report(sub: Any) -> None:
    p = _command(sub, "report", "What a run cost: segments per instance, savings against on-demand, lost work, "
                 "checkpoint stall, goodput, cost per 1,000 steps.",
                 "runner report --bucket s3://my-bucket/runs --run-id exp1 --format html --output exp1.html",
                 commands.report, [_common(json_flag=False)])
    add_flag(p, "--run-id", metavar="ID", help="the run (default: every run under the bucket)")
    add_flag(p, "--format", default="table", choices=("table", "json", "csv", "html"),
             help="output format (default: %(default)s)")
    add_flag(p, "--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    add_flag(p, "--offline", action="store_true",
             help="use the prices recorded in the ledger; do not ask EC2 for the spot price history")
    add_flag(p, "--price-per-hour", type=float, metavar="USD",
             help="price every segment at this hourly rate instead of what the ledger recorded (for a run "
                  "recorded without a price)")
    add_flag(p, "--on-demand-price-per-hour", type=float, metavar="USD",
             help="compare with this on-demand hourly rate instead of the one the ledger recorded")


def _add_drill(sub: Any) -> None:
    p = _command(sub, "drill", "Check that a training command resumes exactly: run it straight, then with K "
                 "interruptions (spot notices, SIGTERMs, kills in mid-upload), and compare the final states bitwise.",
                 "runner drill --bucket s3://my-bucket/drills --interruptions 3 -- python train.py --steps 200",
                 commands.drill, [_common()])
    p.epilog = p.epilog.replace("  0  success", "  0  the final states are identical (drill: exit 0 only then)", 1)
    add_flag(p, "--interruptions", type=int, default=3, metavar="K", help="interruptions of the second run (default: %(default)s)")
    add_flag(p, "--seed", type=int, metavar="S", help="seed of the interruption plan (default: random; it is printed)")
    add_flag(p, "--kinds", default="notice,sigterm,kill-upload", metavar="KIND,...",
             help="interruptions to draw from: notice (EC2 spot notice from a local metadata simulator), sigterm "
                  "(to the supervisor), kill-upload (SIGKILL of the whole instance in the middle of an upload) "
                  "(default: %(default)s)")
    add_flag(p, "--run-prefix", metavar="PREFIX",
             help="the runs are PREFIX-reference and PREFIX-interrupted (default: drill-<UTC time>-<random>)")
    add_flag(p, "--save-every-steps", metavar="N",
             help="passed to runner start (default: its default); a number: the drill plans kills at the saves")
    add_flag(p, "--ignore", action="append", metavar="COMPONENT",
             help="a component allowed to differ (e.g. a wall-clock timer), repeatable")
    p.add_argument("train_command", nargs="*", metavar="COMMAND", help="the training command and its arguments, after --")


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="Train the example voice model through a simulated spot interruption and a resume.",
        description="Train the example voice model under `runner start` on a simulated EC2 spot instance: a spot "
                    "notice part-way, the emergency snapshot, a resume on a new instance with an empty disk, and "
                    "the run's summary, checked against an uninterrupted run.",
        epilog="example:\n  runner demo --steps 300\n\nexit codes: 0 the demo went as shown, 1 it did not, 2 bad usage",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(handler=commands.demo, json=False)
    # Not RUNNER_BUCKET: a shell set up for real training must not get demo runs in its real bucket.
    p.add_argument("--bucket", default="runner-bucket", metavar="DIR",
                   help="where the demo's runs go: a local folder or any bucket URL (default: ./%(default)s)")
    p.add_argument("--steps", type=int, default=300, metavar="N", help="training steps (default: %(default)s)")
    p.add_argument("--save-every-steps", type=int, metavar="N", help="periodic snapshots (default: steps/6)")
    p.add_argument("--step-sleep", type=float, default=0.0, metavar="S", help="extra seconds per step (default: 0)")
    p.add_argument("--no-reference", action="store_true", help="skip the uninterrupted run and the comparison")
    p.add_argument("--quiet", "-q", action="store_true", help=argparse.SUPPRESS)
