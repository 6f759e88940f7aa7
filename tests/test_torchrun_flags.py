"""`runner start --nproc-per-node/--nnodes/--rdzv-endpoint`: the torchrun command built, and the flags refused.

`child_command` is a function of the config (and, for several nodes, of the
rendezvous store, here a real `runner rendezvous` on loopback).  Every
command built is also read back with torchrun's own argument parser, so
the flags mean to torchrun what runner means by them.  Bad flags are run
as real `python -m runner start` subprocesses, all started at once.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from helpers import PYTHON, RendezvousStore, subprocess_env
from runner.rendezvous import RendezvousUnavailable, rendezvous_id
from runner.supervisor.config import StartConfig
from runner.supervisor.launch import JOIN_TIMEOUT_S, child_command, multi_node

RUN = "exp-flags"


def config(command: list[str], **flags) -> StartConfig:
    return StartConfig(**{"bucket": "/unused-bucket", "run_id": RUN, **flags, "command": command})


def as_torchrun_reads_it(argv: list[str]):
    """torchrun's parsed arguments for `python -m torch.distributed.run ARGS` (SystemExit when it refuses them)."""
    from torch.distributed.run import get_args_parser

    assert argv[1:3] == ["-m", "torch.distributed.run"], argv
    return get_args_parser().parse_args(argv[3:])


# -- the command --------------------------------------------------------------------


def test_without_torchrun_flags_the_command_is_the_users():
    command = ["python", "train.py", "--nproc-per-node", "2"]
    cfg = config(command)
    assert not cfg.torchrun and not multi_node(cfg)
    built = child_command(cfg)
    assert built == command
    built.append("--more")
    assert cfg.command == command, "the config's command must not be shared with the caller"


@pytest.mark.parametrize("command, flags, expected", [
    (["python", "train.py", "--x", "1"], dict(nproc_per_node=2),
     ["python", "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1", "--standalone",
      "train.py", "--x", "1"]),
    (["/opt/venv/bin/python3.11", "-m", "pkg.train", "--lr", "3e-4"], dict(nproc_per_node=4),
     ["/opt/venv/bin/python3.11", "-m", "torch.distributed.run", "--nproc-per-node", "4", "--nnodes", "1",
      "--standalone", "-m", "pkg.train", "--lr", "3e-4"]),
    (["python3", "train.py"], dict(nnodes="1"),
     ["python3", "-m", "torch.distributed.run", "--nproc-per-node", "1", "--nnodes", "1", "--standalone",
      "train.py"]),
    (["./train.sh", "--x", "1"], dict(nproc_per_node=2),
     [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1", "--standalone",
      "--no-python", "./train.sh", "--x", "1"]),
    (["ipython", "train.py"], dict(nproc_per_node=2),  # not an interpreter runner can hand torchrun's module to
     [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1", "--standalone",
      "--no-python", "ipython", "train.py"]),
])
def test_one_node_runs_torchrun_standalone_around_the_command(command, flags, expected):
    cfg = config(command, **flags)
    assert cfg.torchrun and not multi_node(cfg)
    built = child_command(cfg)
    assert built == expected

    args = as_torchrun_reads_it(built)
    assert (args.nproc_per_node, args.nnodes, args.standalone) == (built[4], "1", True)
    script = [args.training_script, *args.training_script_args]
    assert script == (command[2:] if args.module else command[1:] if not args.no_python else command)
    assert args.module == ("-m" in command[1:2])
    assert args.no_python == ("--no-python" in expected)


@pytest.mark.parametrize("command", [["python", "-u", "train.py"], ["python", "-c", "print(1)"]])
def test_interpreter_options_give_a_command_torchrun_accepts_or_are_refused(command):
    try:
        cfg = config(command, nproc_per_node=2)
    except ValidationError:
        return  # refused up front: fine
    try:
        as_torchrun_reads_it(child_command(cfg))
    except SystemExit:
        pytest.fail(f"torchrun refuses {child_command(cfg)}")


@pytest.fixture(scope="module")
def store() -> Iterator[RendezvousStore]:
    started = RendezvousStore()
    yield started
    started.stop()


def test_several_nodes_meet_at_the_endpoint_under_the_runs_current_rendezvous_id(store):
    cfg = config(["python", "train.py", "--x", "1"], nnodes="2", rdzv_endpoint=store.endpoint, run_id="multi")
    assert multi_node(cfg)
    built = child_command(cfg)
    assert built[:13] == ["python", "-m", "torch.distributed.run", "--nproc-per-node", "1", "--nnodes", "2",
                          "--rdzv-backend", "c10d", "--rdzv-endpoint", store.endpoint, "--rdzv-id", built[12]]
    assert built[13:] == ["--rdzv-conf", f"is_host=false,join_timeout={JOIN_TIMEOUT_S}", "train.py", "--x", "1"]
    assert re.fullmatch(r"multi\.[0-9]+", built[12]), built[12]
    # An open rendezvous is reused: every node of the job asks and gets the same id.
    assert rendezvous_id(store.endpoint, "multi", timeout_s=10) == built[12]
    assert child_command(cfg)[12] == built[12]

    args = as_torchrun_reads_it(built)
    assert (args.nnodes, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("2", "c10d", store.endpoint,
                                                                                   built[12])
    assert not args.standalone and args.rdzv_conf == f"is_host=false,join_timeout={JOIN_TIMEOUT_S}"
    assert (args.training_script, args.training_script_args) == ("train.py", ["--x", "1"])


def test_each_start_after_the_job_closed_its_rendezvous_gets_the_next_id(store):
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    cfg = config(["./train.sh"], nproc_per_node=8, nnodes="1:4", rdzv_endpoint=store.endpoint, run_id="elastic")
    first = child_command(cfg)
    assert first[first.index("--rdzv-id") + 1] == "elastic.0"
    assert first[first.index("--nnodes") + 1] == "1:4" and first[-2:] == ["--no-python", "./train.sh"]
    # What torchrun does on its way out of a finished or failed job: close the rendezvous for good.
    handler = get_rendezvous_handler(RendezvousParameters(
        backend="c10d", endpoint=store.endpoint, run_id="elastic.0", min_nodes=1, max_nodes=4, is_host="false"))
    handler.set_closed()
    again = child_command(cfg)
    assert again[again.index("--rdzv-id") + 1] == "elastic.1"
    assert again[:again.index("--rdzv-id")] == first[:first.index("--rdzv-id")]


def test_a_store_whose_state_cannot_be_read_stops_the_start_with_rendezvous_unavailable(store):
    from torch.distributed import TCPStore

    host, port = store.endpoint.split(":")
    client = TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10))
    client.set("torch.rendezvous.garbled.0", b"not the rendezvous state")
    cfg = config(["python", "train.py"], nnodes="2", rdzv_endpoint=store.endpoint, run_id="garbled")
    with pytest.raises(RendezvousUnavailable, match="garbled") as caught:
        child_command(cfg)
    assert "\n" not in str(caught.value)


# An unreachable endpoint is not tested through child_command: it waits out TCPStore's connect timeout
# (rendezvous_id's 60 s, in practice about twice that); rendezvous_id with a short timeout is tested in
# test_rendezvous.py.


# -- refused configurations ----------------------------------------------------------


def test_nnodes_with_min_above_max_is_refused():
    with pytest.raises(ValidationError, match="nnodes"):
        config(["python", "train.py"], nnodes="3:2", rdzv_endpoint="127.0.0.1:29400")


PY_TRAIN = ["python", "train.py"]

CASES = {
    # name: (flags, command, environment, the words of the error)
    "nnodes-2-without-endpoint": (["--nnodes", "2"], PY_TRAIN, {}, "--nnodes 2 needs --rdzv-endpoint"),
    "nnodes-range-without-endpoint": (["--nnodes", "1:4"], PY_TRAIN, {}, "--nnodes 1:4 needs --rdzv-endpoint"),
    "nnodes-from-env-without-endpoint": ([], PY_TRAIN, {"RUNNER_NNODES": "3"}, "--nnodes 3 needs --rdzv-endpoint"),
    "torchrun-command": (["--nproc-per-node", "2"], ["torchrun", "--nproc-per-node", "2", "train.py"], {},
                         "torchrun already"),
    "torchrun-path-command": (["--nnodes", "1"], ["/usr/local/bin/torchrun", "train.py"], {}, "torchrun already"),
    "python-m-torchrun-command": (["--nproc-per-node", "2"], [PYTHON, "-m", "torch.distributed.run", "train.py"], {},
                                  "torchrun already"),
    "endpoint-port-0": (["--nnodes", "2", "--rdzv-endpoint", "h:0"], PY_TRAIN, {}, "--rdzv-endpoint"),
    "endpoint-port-too-big": (["--nnodes", "2", "--rdzv-endpoint", "h:99999"], PY_TRAIN, {}, "--rdzv-endpoint"),
    "endpoint-no-host": (["--nnodes", "2", "--rdzv-endpoint", ":80"], PY_TRAIN, {}, "--rdzv-endpoint"),
    "endpoint-port-not-a-number": (["--nnodes", "2", "--rdzv-endpoint", "h:http"], PY_TRAIN, {}, "--rdzv-endpoint"),
    "endpoint-alone": (["--rdzv-endpoint", "h:0"], PY_TRAIN, {}, "'h:0'"),
    "nnodes-0": (["--nnodes", "0"], PY_TRAIN, {}, "--nnodes"),
    "nnodes-negative": (["--nnodes", "-1"], PY_TRAIN, {}, "--nnodes"),
    "nnodes-x": (["--nnodes", "x"], PY_TRAIN, {}, "--nnodes"),
    "nnodes-open-range": (["--nnodes", "2:"], PY_TRAIN, {}, "--nnodes"),
    "nnodes-three-parts": (["--nnodes", "1:2:3"], PY_TRAIN, {}, "--nnodes"),
    "nproc-0": (["--nproc-per-node", "0"], PY_TRAIN, {}, "--nproc-per-node"),
    "nproc-0-from-env": ([], PY_TRAIN, {"RUNNER_NPROC_PER_NODE": "0"}, "--nproc-per-node"),
    "sync-dir-with-nproc": (["--nproc-per-node", "2", "--sync-dir", "ckpt"], PY_TRAIN, {}, "--sync-dir"),
    "sync-dir-with-nnodes": (["--nnodes", "1", "--sync-dir", "ckpt"], PY_TRAIN, {}, "--sync-dir"),
    "sync-dir-with-endpoint": (["--rdzv-endpoint", "127.0.0.1:29400", "--sync-dir", "ckpt"], PY_TRAIN, {},
                               "--sync-dir"),
    "nnodes-min-above-max": (["--nnodes", "3:2", "--rdzv-endpoint", "127.0.0.1:29400"], PY_TRAIN, {},
                             "MIN is above MAX"),
    "python-option": (["--nproc-per-node", "2"], [PYTHON, "-u", "train.py"], {}, "python's own option -u"),
    "nproc-not-a-number": (["--nproc-per-node", "x"], PY_TRAIN, {}, "--nproc-per-node"),  # argparse's own usage error
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> Iterator[dict[str, tuple[subprocess.Popen, Path]]]:
    """Every case as `python -m runner start --bucket DIR FLAGS -- COMMAND`, started at once.

    Should a case be accepted by mistake, it must end fast: no notice source,
    no restarts, no price lookups.
    """
    root = tmp_path_factory.mktemp("torchrun-flags")
    base = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
    procs = {}
    for name, (flags, command, extra, _) in CASES.items():
        bucket = root / name / "bucket"
        (root / name).mkdir()
        argv = [PYTHON, "-m", "runner", "start", "--bucket", str(bucket), "--notice-source", "none",
                "--max-restarts", "0", "--offline-prices", *flags, "--", *command]
        procs[name] = (subprocess.Popen(argv, env=dict(base, **extra), cwd=root / name, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True), bucket)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after 120 s (accepted?): {err[-2000:]}")


@pytest.mark.parametrize("case", [name for name in CASES if name != "nproc-not-a-number"])
def test_bad_torchrun_flags_exit_2_with_one_line_before_anything_starts(cli_runs, case):
    proc, bucket = cli_runs[case]
    out, err = finish(proc)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("runner: error: invalid "), err
    assert CASES[case][3] in lines[0], err
    assert out == ""
    assert not bucket.exists(), "a refused start must not touch the bucket"


def test_a_non_integer_nproc_per_node_is_argparses_usage_error(cli_runs):
    proc, bucket = cli_runs["nproc-not-a-number"]
    _, err = finish(proc)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == "runner start: error: argument --nproc-per-node: invalid int value: 'x'", err
    assert not bucket.exists()


def test_sigterm_while_the_rendezvous_store_does_not_answer_stops_at_once_with_nothing_to_save(tmp_path):
    # Nothing listens on the endpoint: the store would be asked for a minute; a notice must not wait for that.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    base = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
    argv = [PYTHON, "-m", "runner", "start", "--bucket", str(tmp_path / "bucket"), "--notice-source", "none",
            "--offline-prices", "--nnodes", "2", "--rdzv-endpoint", endpoint, "--", "python", "train.py"]
    proc = subprocess.Popen(argv, env=base, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not any("no run lease" in line for line in lines):  # past the lease step, about to ask the store
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.1)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 75, "".join(lines)  # not 1 after the store's minute-long connect timeout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10)
    assert any(f"while asking the rendezvous store at {endpoint}: no child is running" in line for line in lines), \
        "".join(lines)
