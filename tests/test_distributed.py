"""torchrun jobs end to end: sharded snapshots, one step saved by every rank, resharding on resume.

Real torchrun (torch.distributed.run) with the gloo backend on CPU, the job
in tests/dist_training.py, real supervisors (`python -m runner start`) and
real signals; moto's S3 server where the store matters, a local folder
where the test is about processes.  The job's global batch is fixed and split
among the ranks, so an uninterrupted plain run (world size 1) is the
reference for every world size: after a resume the losses must follow it
step for step, and the final parameters must equal it up to float rounding
(the ranks sum gradients in another order).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flaky_proxy import FlakyProxy
from helpers import PYTHON, ROOT, RendezvousStore, subprocess_env
from runner.checkpoint import RunReader
from runner.checkpoint.manifest import Manifest, Reason
from runner.storage import Store, clear_caches

JOB = os.path.join(ROOT, "tests", "dist_training.py")
TOTAL = 16
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone"]


def job_env(extra: dict[str, str] | None = None, **settings: str) -> dict[str, str]:
    """The job's environment: this checkout, no RUNNER_* from outside, one thread per rank."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
    env.update(OMP_NUM_THREADS="1", TOTAL_STEPS=str(TOTAL))
    env.update(extra or {})
    env.update(settings)
    return env


def losses(path: Path) -> dict[int, float]:
    """step -> the job's loss, from a LOSS_LOG (a resumed job appends; the last line of a step wins)."""
    out: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            step, loss = line.split()
            out[int(step)] = float(loss)
    return out


def manifests(bucket: str, run: str) -> list[Manifest]:
    clear_caches()
    reader = RunReader(Store(bucket), run)
    return sorted((reader.load_manifest(sid) for sid in reader.snapshot_ids()), key=lambda m: m.step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
    """An uninterrupted plain run of the job (world size 1): its losses and final parameters."""
    tmp = tmp_path_factory.mktemp("reference")
    env = job_env(RUNNER_BUCKET=str(tmp / "bucket"), RUNNER_RUN_ID="ref", LOSS_LOG=str(tmp / "loss"),
                  PARAMS_OUT=str(tmp / "params.pt"))
    done = subprocess.run([PYTHON, JOB], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ref = losses(tmp / "loss")
    assert sorted(ref) == list(range(1, TOTAL + 1))
    return ref, torch.load(tmp / "params.pt", weights_only=True)


def assert_follows(reference, log: Path, after: int, params: Path | None = None) -> None:
    ref_losses, ref_params = reference
    got = losses(log)
    steps = [s for s in sorted(got) if s > after]
    assert steps == list(range(after + 1, TOTAL + 1)), got
    for s in steps:
        assert got[s] == pytest.approx(ref_losses[s], abs=1e-5), f"step {s}: {got[s]} != {ref_losses[s]}"
    if params is not None:
        mine = torch.load(params, weights_only=True)
        assert mine.keys() == ref_params.keys()
        for name, value in mine.items():
            torch.testing.assert_close(value, ref_params[name], atol=1e-5, rtol=1e-4, msg=name)


class Supervisor:
    """`python -m runner start ...` in its own process; its output goes to a file."""

    def __init__(self, tmp: Path, name: str, bucket: str, run: str, flags: list[str], env: dict[str, str]):
        self.log = tmp / f"{name}.log"
        args = [PYTHON, "-m", "runner", "start", "--bucket", bucket, "--run-id", run, "--notice-source", "none",
                "--max-restarts", "0", *flags, "--", PYTHON, JOB]
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(args, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text()

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"{self.log.name} still running after {timeout} s:\n{self.output}")
        finally:
            self._out.close()


def wait_for_steps(log: Path, n: int, *sups: Supervisor, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(losses(log)) < n:
        for sup in sups:
            assert sup.proc.poll() is None, f"{sup.log.name} ended early:\n{sup.output}"
        assert time.monotonic() < deadline, "the job did not reach step %d:\n%s" % (
            n, "\n".join(s.output for s in sups))
        time.sleep(0.2)


def emergency(found: list[Manifest]) -> Manifest:
    saved = [m for m in found if m.reason is Reason.EMERGENCY]
    assert len(saved) == 1, [(m.step, m.reason) for m in found]
    return saved[0]


def test_two_workers_save_one_step_on_sigterm_and_resume_on_three_and_on_one(tmp_path, s3_bucket_url, s3_env,
                                                                           reference):
    log = tmp_path / "loss"
    env = job_env(s3_env, LOSS_LOG=str(log), STEP_SLEEP="0.3")
    flags = ["--nproc-per-node", "2", "--save-every-steps", "100"]
    sup = Supervisor(tmp_path, "two", s3_bucket_url, "job", flags, env)
    wait_for_steps(log, 4, sup)
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.finish() == 75, sup.output

    saved = emergency(manifests(s3_bucket_url, "job"))
    assert (saved.layout, saved.world_size) == ("sharded", 2)
    names = {Path(f.path).name for f in saved.files}
    assert {"__0_0.distcp", "__1_0.distcp", "rank-0.pt", "rank-1.pt", "dcp-plan.json"} <= names
    assert not any(name.endswith(".metadata") for name in names)  # DCP's pickled plan never reaches the store
    assert max(losses(log)) == saved.step  # every rank stopped at the step it saved

    # 2 -> 3 ranks, under the supervisor.
    resumed = tmp_path / "loss3"
    env3 = job_env(s3_env, LOSS_LOG=str(resumed), PARAMS_OUT=str(tmp_path / "params3.pt"))
    sup3 = Supervisor(tmp_path, "three", s3_bucket_url, "job", ["--nproc-per-node", "3"], env3)
    assert sup3.finish() == 0, sup3.output
    assert f"step {saved.step}" in sup3.output
    assert_follows(reference, resumed, saved.step, tmp_path / "params3.pt")
    final = manifests(s3_bucket_url, "job")[-1]
    assert (final.reason, final.step, final.world_size) == (Reason.FINAL, TOTAL, 3)

    # 2 -> 1: the emergency snapshot, forked into a run that a plain process resumes.
    fork = subprocess.run([PYTHON, "-m", "runner", "fork", "--bucket", s3_bucket_url,
                           "--from", f"job@{saved.snapshot_id}", "--to", "plain"],
                          env=job_env(s3_env), capture_output=True, text=True, timeout=120)
    assert fork.returncode == 0, fork.stderr
    plain = tmp_path / "loss1"
    env1 = job_env(s3_env, LOSS_LOG=str(plain), PARAMS_OUT=str(tmp_path / "params1.pt"))
    sup1 = Supervisor(tmp_path, "one", s3_bucket_url, "plain", [], env1)
    assert sup1.finish() == 0, sup1.output
    assert_follows(reference, plain, saved.step, tmp_path / "params1.pt")


def test_a_periodic_save_commits_in_the_background_while_training_goes_on(tmp_path, s3_bucket_url, s3_env):
    # The step-4 snapshot's uploads are held at a proxy in front of moto until the job has trained step 6.
    uploads_may_go = threading.Event()

    def hold(method: str, path: str) -> None:
        if method in ("PUT", "POST") and "/data/000000000004-" in path:
            uploads_may_go.wait(120)

    log = tmp_path / "loss"
    with FlakyProxy(s3_env["AWS_ENDPOINT_URL"], hold=hold) as proxy:
        env = job_env(s3_env, RUNNER_BUCKET=s3_bucket_url, RUNNER_RUN_ID="bg", RUNNER_SAVE_EVERY_STEPS="4",
                      TOTAL_STEPS="8", LOSS_LOG=str(log), AWS_ENDPOINT_URL=proxy.url)
        job = subprocess.Popen([*TORCHRUN, "--nproc-per-node", "2", JOB], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while max(losses(log), default=0) < 6:
                assert job.poll() is None and time.monotonic() < deadline, "training stopped at the save of step 4"
                time.sleep(0.1)
            assert manifests(s3_bucket_url, "bg") == []  # step 4 is still being uploaded
        finally:
            uploads_may_go.set()
            try:
                out, _ = job.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
                out, _ = job.communicate()
    assert job.returncode == 0, out
    committed = sorted((m.step, m.reason.value) for m in manifests(s3_bucket_url, "bg"))
    assert committed == [(4, "periodic"), (8, "final")]  # the final save superseded step 8's periodic one


def launch(ranks: int) -> list[str]:
    """The job on `ranks` ranks: torchrun, or a plain process for one (no process group at all)."""
    return [*TORCHRUN, "--nproc-per-node", str(ranks), JOB] if ranks > 1 else [PYTHON, JOB]


@pytest.mark.parametrize("mode,saved_by,resumed_by", [("fsdp", 2, 3), ("ddp", 4, 2), ("fsdp", 3, 1)])
def test_a_job_resumes_at_another_world_size_on_the_reference_trajectory(tmp_path, reference, mode, saved_by,
                                                                         resumed_by):
    bucket = str(tmp_path / "bucket")
    log = tmp_path / "loss"
    env = job_env(RUNNER_BUCKET=bucket, RUNNER_RUN_ID="reshard", RUNNER_SAVE_EVERY_STEPS="100", MODE=mode,
                  LOSS_LOG=str(log), NOTICE_AT="5")
    done = subprocess.run(launch(saved_by), env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    saved = emergency(manifests(bucket, "reshard"))
    assert (saved.step, saved.world_size, saved.layout) == (5, saved_by, "sharded")

    resumed = tmp_path / "loss-resumed"
    env.update(LOSS_LOG=str(resumed), PARAMS_OUT=str(tmp_path / "params.pt"), NOTICE_AT="-1")
    done = subprocess.run(launch(resumed_by), env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert_follows(reference, resumed, 5, tmp_path / "params.pt")


def test_a_notice_on_one_rank_makes_every_rank_save_the_same_step(tmp_path, reference):
    # Rank 0 alone gets the request at step 7; rank 1 learns of it at the step boundary.
    bucket = str(tmp_path / "bucket")
    log = tmp_path / "loss"
    env = job_env(RUNNER_BUCKET=bucket, RUNNER_RUN_ID="agree", RUNNER_SAVE_EVERY_STEPS="3", LOSS_LOG=str(log),
                  NOTICE_AT="7")
    done = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", JOB], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    found = manifests(bucket, "agree")
    assert [(m.step, m.reason) for m in found][-1] == (7, Reason.EMERGENCY)
    assert {(m.step, m.reason) for m in found[:-1]} <= {(3, Reason.PERIODIC), (6, Reason.PERIODIC)}
    assert max(losses(log)) == 7


@pytest.mark.parametrize("phase,rank", [("before-data", 1), ("mid-data", 1), ("before-manifest", 1),
                                        ("before-manifest", 0)])
def test_sigkill_of_one_rank_mid_save_commits_nothing_and_the_job_resumes(tmp_path, reference, phase, rank):
    bucket = str(tmp_path / "bucket")
    log = tmp_path / "loss"
    env = job_env(RUNNER_BUCKET=bucket, RUNNER_RUN_ID="kill", RUNNER_SAVE_EVERY_STEPS="4", LOSS_LOG=str(log),
                  KILL_RANK=str(rank), RUNNER_FAULT_KILL_AT=f"{phase}:2")
    done = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", JOB], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode != 0, done.stderr  # torchrun reports the killed worker
    assert [m.step for m in manifests(bucket, "kill")] == [4]  # the save of step 8 left no manifest
    verify = subprocess.run([PYTHON, "-m", "runner", "verify", "--bucket", bucket, "--run-id", "kill"],
                            env=job_env(), capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    resumed = tmp_path / "loss-resumed"
    env.update(LOSS_LOG=str(resumed), PARAMS_OUT=str(tmp_path / "params.pt"))
    del env["RUNNER_FAULT_KILL_AT"]
    done = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", JOB], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert_follows(reference, resumed, 4, tmp_path / "params.pt")


def test_a_corrupt_shard_sends_the_resume_back_to_the_snapshot_before(tmp_path, reference):
    bucket = str(tmp_path / "bucket")
    env = job_env(RUNNER_BUCKET=bucket, RUNNER_RUN_ID="bad", RUNNER_SAVE_EVERY_STEPS="3", TOTAL_STEPS="8")
    done = subprocess.run([*TORCHRUN, "--nproc-per-node", "2", JOB], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    found = manifests(bucket, "bad")
    assert [(m.step, m.reason) for m in found] == [(3, Reason.PERIODIC), (6, Reason.PERIODIC), (8, Reason.FINAL)]
    newest = found[-1]
    shard = Path(bucket) / "bad" / "data" / newest.snapshot_id / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))

    verify = subprocess.run([PYTHON, "-m", "runner", "verify", "--bucket", bucket, "--run-id", "bad"],
                            env=job_env(), capture_output=True, text=True, timeout=120)
    assert verify.returncode != 0 and newest.snapshot_id in verify.stdout + verify.stderr

    log = tmp_path / "loss"
    env.update(LOSS_LOG=str(log), PARAMS_OUT=str(tmp_path / "params.pt"), TOTAL_STEPS=str(TOTAL))
    done = subprocess.run([*TORCHRUN, "--nproc-per-node", "3", JOB], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert_follows(reference, log, 6, tmp_path / "params.pt")
    assert newest.snapshot_id in done.stderr  # the skipped snapshot is named in a warning


@pytest.fixture
def rendezvous_store() -> Iterator[str]:
    """`runner rendezvous` on a free loopback port, for the whole test: its endpoint."""
    store = RendezvousStore()
    yield store.endpoint
    store.stop()


def test_a_notice_to_one_node_stops_both_at_one_step_and_both_resume(tmp_path, s3_bucket_url, s3_env,
                                                                     rendezvous_store, reference):
    flags = ["--nproc-per-node", "1", "--nnodes", "2", "--rdzv-endpoint", rendezvous_store]
    log = tmp_path / "loss"  # rank 0 writes it, on whichever node it landed
    env = job_env(s3_env, LOSS_LOG=str(log), STEP_SLEEP="0.3")
    a = Supervisor(tmp_path, "node-a", s3_bucket_url, "multi", flags, env)
    b = Supervisor(tmp_path, "node-b", s3_bucket_url, "multi", flags, env)
    wait_for_steps(log, 4, a, b, timeout=180)
    a.proc.send_signal(signal.SIGTERM)  # the notice reaches node a only
    assert (a.finish(), b.finish()) == (75, 76), a.output + b.output
    assert re.search(r"another node was preempted: the job committed snapshot \S+ at step \d+", b.output), b.output

    saved = emergency(manifests(s3_bucket_url, "multi"))
    assert saved.world_size == 2 and max(losses(log)) == saved.step

    # Capacity is back: both nodes start again and the job ends where the reference does.
    env = job_env(s3_env, LOSS_LOG=str(tmp_path / "loss2"), PARAMS_OUT=str(tmp_path / "params.pt"))
    a = Supervisor(tmp_path, "node-a2", s3_bucket_url, "multi", flags, env)
    b = Supervisor(tmp_path, "node-b2", s3_bucket_url, "multi", flags, env)
    assert (a.finish(), b.finish()) == (0, 0), a.output + b.output
    assert_follows(reference, tmp_path / "loss2", saved.step, tmp_path / "params.pt")

    # The cost report: four paid segments, one interruption (the peer-stopped node was not reclaimed).
    report = subprocess.run([PYTHON, "-m", "runner", "report", "--bucket", s3_bucket_url, "--run-id", "multi",
                             "--format", "json", "--offline"], env=job_env(s3_env), capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 0, report.stderr
    totals = json.loads(report.stdout)
    assert sorted(seg["end_reason"] for seg in totals["segments"]) == ["finished", "finished", "peer-stopped",
                                                                      "preempted"]
    assert (totals["interruptions"], totals["status"], totals["lost_steps"]) == (1, "finished", 0), report.stdout
