"""`python -m runner.rendezvous`: a store no training node hosts, and two torchrun "nodes" meeting through it.

The nodes are two torchrun processes on loopback, each with one gloo worker
that all-reduces its rank + 1, exactly as two machines would run them against
the on-demand rendezvous instance (`--rdzv-conf is_host=false`: a node never
hosts the store).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import textwrap
import threading
from collections.abc import Iterator

import pytest

from helpers import PYTHON, RendezvousStore, subprocess_env
from runner import rendezvous

WORKER = textwrap.dedent("""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    print(f"rank={dist.get_rank()} world_size={dist.get_world_size()} sum={t.item():g}", flush=True)
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def store() -> Iterator[RendezvousStore]:
    started = RendezvousStore(("-m", "runner.rendezvous"))
    yield started
    started.stop()


def run_nodes(endpoint: str, rdzv_id: str, script, nodes: int = 2) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes N --nproc-per-node 1 ...` started N times at once, as N machines would."""
    argv = [PYTHON, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
            "--rdzv-conf", "is_host=false,join_timeout=60", "--local-addr", "127.0.0.1",
            "--max-restarts", "0", str(script)]
    procs = [subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for _ in range(nodes)]
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        results.append(subprocess.CompletedProcess(argv, proc.returncode, out))
    return results


def assert_group_of_two(results: list[subprocess.CompletedProcess]) -> None:
    out = "\n".join(r.stdout for r in results)
    assert [r.returncode for r in results] == [0, 0], out[-4000:]
    lines = sorted(re.findall(r"rank=\d world_size=\d sum=\S+", out))
    assert lines == ["rank=0 world_size=2 sum=3", "rank=1 world_size=2 sum=3"], out[-4000:]


def test_two_torchrun_nodes_form_a_group_through_a_store_that_neither_hosts(store, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    assert_group_of_two(run_nodes(store.endpoint, "t1", script))
    # What rendezvous_id() is for: the store outlives the job, and torchrun closed "t1" on its way out.
    again = run_nodes(store.endpoint, "t1", script)
    assert all(r.returncode != 0 and "RendezvousClosedError" in r.stdout for r in again), again[0].stdout[-3000:]


def close_rendezvous(endpoint: str, rdzv_id: str) -> None:
    """What every torchrun does on its way out unless a signal stopped it: close its rendezvous for good."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    handler = get_rendezvous_handler(RendezvousParameters(
        backend="c10d", endpoint=endpoint, run_id=rdzv_id, min_nodes=2, max_nodes=2, is_host="false"))
    handler.set_closed()
    assert handler.is_closed()


def test_rendezvous_id_moves_every_node_to_the_next_incarnation_once_the_job_closed_it(store, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    first = rendezvous.rendezvous_id(store.endpoint, "exp1", timeout_s=10)
    assert first == "exp1.0"
    assert rendezvous.rendezvous_id(store.endpoint, "exp1", timeout_s=10) == first, "open: no reason to move on"
    close_rendezvous(store.endpoint, first)
    # Every node restarting after the job ended asks at once; the counter moves by one, not by one per node.
    ids: list[str] = []
    askers = [threading.Thread(target=lambda: ids.append(rendezvous.rendezvous_id(store.endpoint, "exp1", 10)))
              for _ in range(4)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(30)
    assert ids == ["exp1.1"] * 4
    assert_group_of_two(run_nodes(store.endpoint, ids[0], script))
    # The job closed exp1.1 on its way out (the case the first test shows with real torchrun restarts).
    assert rendezvous.rendezvous_id(store.endpoint, "exp1", timeout_s=10) == "exp1.2"
    assert rendezvous.rendezvous_id(store.endpoint, "other-run", timeout_s=10) == "other-run.0"


def test_sigterm_stops_the_store_with_exit_0():
    started = RendezvousStore(("-m", "runner.rendezvous"))
    assert rendezvous.rendezvous_id(started.endpoint, "x", timeout_s=10) == "x.0"  # it serves
    assert started.stop(signal.SIGTERM) == 0
    assert started.proc.stderr.read() == ""


def test_a_bad_port_is_one_line_on_stderr_and_exit_2():
    for port in ("70000", "-1", "http"):
        result = subprocess.run([PYTHON, "-m", "runner.rendezvous", "--port", port], env=subprocess_env(),
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
        assert "--port" in result.stderr and "Traceback" not in result.stderr


def test_a_port_in_use_is_one_line_on_stderr_and_exit_1(capfd):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert rendezvous.main(["--port", str(port), "--host", "127.0.0.1"]) == 1
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err and "--port" in err, err


def test_an_unreachable_store_is_one_line_error():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(rendezvous.RendezvousUnavailable, match=f"127.0.0.1:{port}") as caught:
        rendezvous.rendezvous_id(f"127.0.0.1:{port}", "x", timeout_s=1)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("endpoint, expected", [
    ("10.0.0.5:29400", ("10.0.0.5", 29400)),
    ("rdzv.internal", ("rdzv.internal", 29400)),
    ("[fd00::5]:29500", ("fd00::5", 29500)),
    ("fd00::5", ("fd00::5", 29400)),
])
def test_parse_endpoint(endpoint, expected):
    assert rendezvous.parse_endpoint(endpoint) == expected


@pytest.mark.parametrize("endpoint", ["", "host:http", "host:70000", ":29400"])
def test_parse_endpoint_rejects(endpoint):
    with pytest.raises(ValueError, match="HOST:PORT"):
        rendezvous.parse_endpoint(endpoint)
