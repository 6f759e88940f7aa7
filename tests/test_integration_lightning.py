"""The PyTorch Lightning integration end to end: real supervisors, real Lightning training on CPU.

A spot notice from the IMDS simulator reaches a Lightning fit under `runner start` on moto's S3;
the callback saves at the next batch, the supervisor exits 75, a second `runner start` in an
empty folder finishes the run, and the loss trajectory and final parameters equal an
uninterrupted run's bit for bit.  A corrupt newest snapshot falls back to the previous one; a
forged one (valid checksums over a pickle that runs code) is refused, never executed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
import torch

from helpers import PYTHON, ROOT, subprocess_env
from runner import cli
from runner.checkpoint import RunReader
from runner.checkpoint.manifest import Reason
from runner.cost.ledger import read_events
from runner.sim.imds import ImdsSimulator
from runner.storage import Store, clear_caches
from supervisor_harness import RUN, start, supervisors  # noqa: F401  (supervisors: a fixture)

pytest.importorskip("lightning")

SCRIPT = os.path.join(ROOT, "tests", "lightning_train.py")
STEPS = 40


def _train(*args: str) -> list[str]:
    return [PYTHON, SCRIPT, "--steps", str(STEPS), *args]


def _losses(output: str) -> dict[int, set[str]]:
    """Step -> every loss printed for it (a step redone after a fallback prints twice)."""
    seen: dict[int, set[str]] = {}
    for step, loss in re.findall(r"^step (\d+) loss (\S+)$", output, flags=re.M):
        seen.setdefault(int(step), set()).add(loss)
    return seen


def _params(output: str) -> str:
    return re.search(r"^params (\w+)$", output, flags=re.M).group(1)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> str:
    """An uninterrupted run (no supervisor, a local bucket): the reference trajectory."""
    bucket = tmp_path_factory.mktemp("baseline")
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
    env.update(RUNNER_BUCKET=str(bucket), RUNNER_RUN_ID="ref")
    done = subprocess.run(_train("--sleep", "0"), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(_losses(done.stdout)) == STEPS
    return done.stdout


def _snapshots(bucket: str) -> list:
    clear_caches()
    return list(RunReader(Store(bucket), RUN).valid_snapshots())


def test_spot_notice_saves_at_the_next_batch_and_the_resumed_run_is_bitwise_the_uninterrupted_one(
        tmp_path, supervisors, s3_bucket_url, baseline, capsys) -> None:
    with ImdsSimulator() as sim:
        first = start(supervisors, tmp_path, s3_bucket_url, [], name="a", command=_train("--sleep", "0.1"),
                      notice_source="ec2", imds_endpoint=sim.url, poll_interval_s=0.2,
                      save_every_steps=10, keep_last=2)
        first.wait_for(r"^step 12 ", timeout=90)
        sim.schedule_spot_notice()
        assert first.finish(90) == 75, first.output
    stopped = int(first.wait_for(r"^stopped at step (\d+)$").group(1))
    reached = max(_losses(first.output))
    assert reached == stopped  # the step in flight at the notice is the one saved
    (emergency,) = [m for m in _snapshots(s3_bucket_url) if m.reason is Reason.EMERGENCY]
    assert emergency.step == stopped and {f.path for f in emergency.files} == {"lightning.pt", "_rng.pt"}
    assert cli.main(["pin", "--bucket", s3_bucket_url, "--run-id", RUN, emergency.snapshot_id]) == 0

    second = start(supervisors, tmp_path, s3_bucket_url, [], name="b", command=_train("--sleep", "0"),
                   notice_source="none", save_every_steps=10, keep_last=2)
    assert second.finish(120) == 0, second.output
    assert f"resume from {stopped}" in second.output
    assert f"finished at step {STEPS}" in second.output
    resumed_at = min(_losses(second.output)) - 1
    assert resumed_at == stopped and reached - resumed_at <= 1  # work redone: at most one step (here none)

    merged = _losses(first.output)
    for step, losses in _losses(second.output).items():
        merged.setdefault(step, set()).update(losses)
    assert merged == _losses(baseline)  # every step's loss, bit for bit (float.hex)
    assert _params(second.output) == _params(baseline)

    snapshots = _snapshots(s3_bucket_url)
    assert snapshots[0].final and snapshots[0].step == STEPS
    # keep-K through runner: the newest 2, plus the pinned emergency snapshot.
    assert {m.snapshot_id for m in snapshots[2:]} == {emergency.snapshot_id}
    clear_caches()
    stalls = [e.get("stall_s") for e in read_events(Store(s3_bucket_url), RUN) if e.kind == "snapshot"]
    assert stalls and all(s is not None and s >= 0 for s in stalls)
    latency = re.search(r"acknowledged \(step \d+\) ([\d.]+) s after the notice", first.output)
    with capsys.disabled():  # the figures the docs quote
        print(f"\nlightning: notice reached at step {reached}, saved {stopped}, redone {reached - resumed_at}; "
              f"notice -> ack {latency and latency.group(1)} s; snapshot stalls (s): "
              f"{sorted(round(s, 4) for s in stalls)}")


def test_a_corrupt_newest_snapshot_falls_back_to_the_previous_one(tmp_path, supervisors, baseline) -> None:
    bucket = str(tmp_path / "bucket")
    first = start(supervisors, tmp_path, bucket, [], name="a", command=_train("--sleep", "0.1"),
                  save_every_steps=5)
    first.wait_for(r"^step 17 ", timeout=90)
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish(90) == 75, first.output
    newest, previous = _snapshots(bucket)[:2]
    assert newest.reason is Reason.EMERGENCY and newest.step >= 17 and previous.reason is Reason.PERIODIC
    data = tmp_path / "bucket" / RUN / "data" / newest.snapshot_id / "lightning.pt"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum can tell
    data.write_bytes(bytes(raw))

    second = start(supervisors, tmp_path, bucket, [], name="b", command=_train("--sleep", "0"),
                   save_every_steps=5)
    assert second.finish(120) == 0, second.output
    assert re.search(rf"snapshot {newest.snapshot_id} .*unusable \(lightning\.pt does not match its checksum\); "
                     "trying the previous one", second.output), second.output
    assert f"resume from {previous.step}" in second.output
    merged = _losses(first.output)
    for step, losses in _losses(second.output).items():
        merged.setdefault(step, set()).update(losses)
    assert merged == _losses(baseline)  # the redone steps came out the same, too
    assert _params(second.output) == _params(baseline)


class _Boom:
    """What a forger would pickle: unpickling it would run a command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_forged_snapshot_with_valid_checksums_is_refused_not_executed(tmp_path) -> None:
    import io

    from runner.checkpoint.writer import PendingSnapshot, RawFile, write_snapshot
    from runner.errors import UnsafeDataError
    from runner.integrations.lightning import RunnerCheckpoint

    bucket, marker = str(tmp_path / "bucket"), tmp_path / "pwned"
    store = Store(bucket)
    good = io.BytesIO()
    torch.save({"global_step": 3, "state_dict": {"w": torch.ones(2)}}, good)
    forged = io.BytesIO()
    torch.save({"global_step": 9, "hyper_parameters": _Boom(str(marker))}, forged)
    for step, body in ((3, good), (9, forged)):
        write_snapshot(store, "r", PendingSnapshot(step=step, reason=Reason.PERIODIC,
                                                    components={"lightning": RawFile("lightning.pt", body.getvalue())}))
    ckpt = RunnerCheckpoint(bucket, "r")
    path = ckpt.resume_path()
    assert ckpt.resumed_from.step == 3 and torch.load(path, weights_only=True)["global_step"] == 3
    assert not marker.exists()

    # Only the forged one left: refusing beats starting afresh over the run.
    store.delete([f"r/manifests/{ckpt.resumed_from.snapshot_id}.json"])
    with pytest.raises(UnsafeDataError, match="no snapshot could be loaded safely"):
        RunnerCheckpoint(bucket, "r").resume_path()
    assert not marker.exists()
    ckpt.close()


def test_resumable_loader_resumes_after_the_batches_it_delivered_even_with_workers() -> None:
    from torch.utils.data import TensorDataset

    from runner.integrations.lightning import ResumableDataLoader

    data = TensorDataset(torch.arange(20.0))

    def batches(iterable) -> list[list[float]]:
        return [b[0].tolist() for b in iterable]

    reference = ResumableDataLoader(data, batch_size=3, shuffle=True, seed=5)
    epochs = [batches(reference), batches(reference)]
    assert len(reference) == len(epochs[1]) == 7 and epochs[0] != epochs[1]
    for workers in (0, 2):
        loader = ResumableDataLoader(data, batch_size=3, shuffle=True, seed=5, num_workers=workers)
        assert batches(loader) == epochs[0]
        it = iter(loader)
        head = [next(it)[0].tolist() for _ in range(4)]  # workers have fetched further ahead by now
        saved = loader.state_dict()
        del it
        again = ResumableDataLoader(data, batch_size=3, shuffle=True, seed=5, num_workers=workers)
        again.load_state_dict(saved)
        assert len(again) == 7
        assert head + batches(again) == epochs[1]


def test_without_a_bucket_the_script_says_so_in_one_line(tmp_path) -> None:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
    done = subprocess.run(_train(), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "RUNNER_BUCKET" in lines[0] and "Traceback" not in done.stderr, done.stderr
