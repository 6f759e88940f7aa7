"""Directory-sync mode with one checkpoint file rewritten in place (nanoGPT's `ckpt.pt`).

End to end: tests/nanogpt_train.py (a tiny transformer on CPU that knows
nothing of runner) under real supervisors on moto's S3 server, a spot notice
from the EC2 metadata simulator, a resume in an empty folder, compared bit for
bit with an uninterrupted run.  In process: reads torn by a rewrite that keeps
(size, mtime, inode), and a writer killed in the middle of `torch.save`, are
never published.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import PYTHON, subprocess_env
from runner.checkpoint import RunReader
from runner.checkpoint.manifest import Reason
from runner.storage import Store, clear_caches
from runner.supervisor.syncdir import DirSync, decode_path
from supervisor_harness import RUN, manifests, start, supervisors  # noqa: F401  (fixture)

SCRIPT = str(Path(__file__).with_name("nanogpt_train.py"))
SAVE = 5  # --save_interval: iterations between two rewrites of ckpt.pt
ITERS = 60
FAST = dict(sync_settle_s=0.5, sync_scan_s=0.25, keep_last=1000)


def _command(*extra: str) -> list[str]:
    """The documented command line: resume by the flag when the restored folder has a ckpt.pt."""
    args = " ".join(["--out_dir", "out", "--max_iters", str(ITERS), "--save_interval", str(SAVE), *extra])
    return ["sh", "-c", f"exec {PYTHON} {SCRIPT} {args} $([ -f out/ckpt.pt ] && echo --init_from=resume)"]


def _losses(output: str) -> dict[int, str]:
    return {int(i): loss for i, loss in re.findall(r"^iter (\d+) loss (\S+)$", output, re.M)}


def _ckpt(reader: RunReader, manifest) -> dict:
    entry = next(f for f in manifest.files if decode_path(f.path) == "ckpt.pt")
    return torch.load(io.BytesIO(reader.read_file(manifest, entry)), weights_only=True)


def _ls_json(bucket: str, env: dict[str, str]) -> list[dict]:
    done = subprocess.run([PYTHON, "-m", "runner", "ls", "--bucket", bucket, "--run-id", RUN, "--json"],
                          env=subprocess_env(env), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_nanogpt_style_ckpt_spot_notice_then_resume_in_an_empty_folder_matches_the_uninterrupted_run(
        tmp_path, supervisors, s3_bucket_url, s3_env):
    from runner.sim.imds import ImdsSimulator

    reference = subprocess.run([PYTHON, SCRIPT, "--out_dir", str(tmp_path / "ref"), "--max_iters", str(ITERS),
                                "--save_interval", str(SAVE), "--sleep", "0"],
                               capture_output=True, text=True, timeout=120)  # fmt: skip
    assert reference.returncode == 0, reference.stderr
    expected = _losses(reference.stdout)
    assert sorted(expected) == list(range(1, ITERS + 1))

    with ImdsSimulator() as sim:
        first = start(supervisors, tmp_path, s3_bucket_url, [], name="a", command=_command("--sleep", "0.05"),
                      sync_dir="out", notice_source="ec2", imds_endpoint=sim.url, poll_interval_s=0.5, **FAST)
        first.wait_for(r"watching ec2 notices")
        first.wait_for(r"^iter 27 ")
        sim.schedule_spot_notice(0)
        assert first.finish(60) == 75, first.output
    out = first.output
    assert "SIGTERM to the child's process group" in out
    # The iteration the child was at when the supervisor heard the notice, and the last one it ran.
    heard = out[:out.index("EC2 spot interruption")]
    at_notice = max(_losses(heard))
    reached = max(_losses(out))
    newest = manifests(s3_bucket_url)[0]
    reader = RunReader(Store(s3_bucket_url), RUN)
    assert newest.reason is Reason.SYNC and newest.step % SAVE == 0, out
    assert _ckpt(reader, newest)["iter_num"] == newest.step  # the step is the training step, from inside ckpt.pt
    # Lost: at most one save interval behind what the child had done when the notice came.
    assert at_notice - SAVE < newest.step <= reached, (at_notice, newest.step, reached)
    assert reached - newest.step <= 2 * SAVE, (newest.step, reached)  # the child trains on while DIR is synced
    held = re.search(r"sync snapshot \S+ holds .*, ([\d.]+) s after the notice; preempted", out)
    assert held, out
    print(f"notice at iter {at_notice}, snapshot at iter {newest.step} ({held.group(1)} s after the notice), child "
          f"stopped at iter {reached}: {max(0, at_notice - newest.step)} iteration(s) lost, {reached - newest.step} "
          "redone")
    assert {i: expected[i] for i in _losses(out)} == _losses(out)

    # A new instance: an empty folder.  ckpt.pt is there before the command's `[ -f out/ckpt.pt ]` runs.
    second = start(supervisors, tmp_path, s3_bucket_url, [], name="b", command=_command("--sleep", "0"),
                   sync_dir="out", notice_source="none", **FAST)
    assert second.finish(90) == 0, second.output
    assert f"resuming from out/ckpt.pt at iter {newest.step}" in second.output
    resumed = _losses(second.output)
    assert sorted(resumed) == list(range(newest.step + 1, ITERS + 1))
    assert resumed == {i: expected[i] for i in resumed}  # bit for bit (float.hex)

    clear_caches()
    listed = _ls_json(s3_bucket_url, s3_env)
    steps = sorted({row["step"] for row in listed})
    assert steps[-1] == ITERS and newest.step in steps
    assert all(step % SAVE == 0 for step in steps), steps  # iter_num values, not a sync counter
    final = manifests(s3_bucket_url)[0]
    assert final.final and final.step == ITERS
    # The cost report counts training steps (iter_num), not syncs.
    done = subprocess.run([PYTHON, "-m", "runner", "report", "--bucket", s3_bucket_url, "--run-id", RUN, "--offline",
                           "--format", "json"], env=subprocess_env(s3_env), capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["steps"] == ITERS and report["interruptions"] == 1, report
    assert [(s["start_step"], s["end_step"]) for s in report["segments"]] == [(0, newest.step), (newest.step, ITERS)]


def test_a_ckpt_rewritten_every_few_hundredths_of_a_second_is_published_at_every_scan(tmp_path, supervisors):
    bucket = str(tmp_path / "bucket")
    scan_s = 0.5
    command = ["sh", "-c", f"exec {PYTHON} {SCRIPT} --out_dir out --max_iters 200 --save_interval 1 --sleep 0.02 "
               "--n_embd 96"]
    sup = start(supervisors, tmp_path, bucket, [], command=command, sync_dir="out", notice_source="none",
                **dict(FAST, sync_scan_s=scan_s))  # fmt: skip
    assert sup.finish(120) == 0, sup.output
    saves = {int(i): float(t) for i, t in re.findall(r"^saved ckpt\.pt at iter (\d+) at ([\d.]+)$", sup.output, re.M)}
    assert len(saves) == 200
    snapshots = list(reversed(manifests(bucket)))  # oldest first
    syncs = [m for m in snapshots if m.reason is Reason.SYNC]
    reader = RunReader(Store(bucket), RUN)
    # Every published ckpt.pt is whole, and the snapshot's step is the iter_num inside it.
    for manifest in snapshots:
        assert _ckpt(reader, manifest)["iter_num"] == manifest.step
    steps = [m.step for m in snapshots]
    assert steps == sorted(steps) and steps[-1] == 200, steps  # never older (the final one repeats the last)
    # Published about every scan while the file never stayed unchanged for a settle period.
    times = [m.created_at.timestamp() for m in syncs]
    span = times[-1] - times[0]
    gaps = [b - a for a, b in zip(times, times[1:])]
    lags = sorted(m.created_at.timestamp() - saves[m.step] for m in syncs)  # save of that iter -> published
    print(f"{len(syncs)} sync snapshots over {span:.1f} s of training (scan {scan_s} s); largest gap "
          f"{max(gaps):.2f} s; {len(saves)} rewrites; sync lag median {lags[len(lags) // 2]:.3f} s, "
          f"max {lags[-1]:.3f} s")
    assert len(syncs) >= 4 and max(gaps) <= 4 * scan_s + 1.0, gaps


# -- in process: torn reads and killed writers ---------------------------------------------------


def _same_size_versions(count: int) -> list[bytes]:
    versions = []
    for k in range(1, count + 1):
        buf = io.BytesIO()
        torch.save({"iter_num": k, "w": torch.full((200_000,), float(k))}, buf)
        versions.append(buf.getvalue())
    assert len({len(v) for v in versions}) == 1
    return versions


def test_a_read_torn_by_a_rewrite_that_keeps_size_mtime_and_inode_is_never_published(tmp_path):
    """The zip CRCs are what catch it: the stat before and after the read cannot."""
    versions = _same_size_versions(6)
    src = tmp_path / "out"
    src.mkdir()
    path = src / "ckpt.pt"
    path.write_bytes(versions[0])
    frozen = os.stat(path).st_mtime_ns
    stop = threading.Event()

    def rewrite() -> None:  # in place, in chunks, then the old mtime back: (size, mtime, inode) never change
        k = 0
        while not stop.is_set():
            k = (k + 1) % len(versions)
            with open(path, "r+b") as f:
                data = versions[k]
                for i in range(0, len(data), len(data) // 4 + 1):
                    f.write(data[i:i + len(data) // 4 + 1])
                    f.flush()
                    time.sleep(0.002)
            os.utime(path, ns=(frozen, frozen))

    ds = DirSync(Store(str(tmp_path / "bucket")), "r", src, keep_last=1000, settle_s=0.05, scan_s=0.05)
    ds._step = 0
    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    published = []
    try:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            ds._stored.clear()  # make every scan see a change to publish (the fingerprint never says so)
            ds._seen.clear()
            ds._torn.clear()
            ds._suspect.clear()
            manifest = ds.tick()
            if manifest is not None:
                published.append(manifest)
    finally:
        stop.set()
        writer.join()
    reader = RunReader(Store(str(tmp_path / "bucket")), "r")
    contents = [reader.read_file(m, m.files[0]) for m in published]
    assert published, "nothing was published"
    assert all(data in versions for data in contents), "a torn ckpt.pt was published"
    for manifest, data in zip(published, contents):
        assert manifest.step >= torch.load(io.BytesIO(data), weights_only=True)["iter_num"]


WRITER = r'''
import io, sys, time, torch
state = {"iter_num": 0, "w": torch.randn(2_000_000)}
buf = io.BytesIO()
torch.save(state, buf)
print(len(buf.getvalue()), flush=True)  # the size of a whole save
while True:
    state["iter_num"] += 1
    torch.save(state, sys.argv[1])
    print(state["iter_num"], flush=True)
    time.sleep(0.03)  # a training step between two saves
'''


def test_a_writer_killed_in_the_middle_of_torch_save_is_never_published_and_its_file_is_put_back(tmp_path):
    src = tmp_path / "out"
    src.mkdir()
    path = src / "ckpt.pt"
    proc = subprocess.Popen([PYTHON, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        whole = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "1"
        ds = DirSync(Store(str(tmp_path / "bucket")), "r", src, keep_last=1000, settle_s=0.2, scan_s=0.1)
        ds.start()
        time.sleep(1.5)
        while os.stat(path).st_size in (0, whole):  # kill it half-way through a save
            pass
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    half = path.read_bytes()
    assert 0 < len(half) < whole
    ds.after_exit(clean=False)
    reader = RunReader(Store(str(tmp_path / "bucket")), "r")
    snapshots = list(reader.valid_snapshots())
    assert len(snapshots) >= 2, "the rewritten file was not published while it was written"
    for manifest in snapshots:
        data = reader.read_file(manifest, manifest.files[0])
        assert torch.load(io.BytesIO(data), weights_only=True)["iter_num"] == manifest.step
    # The half-written file is put back to its newest synced version, which the restarted trainer can load.
    assert path.read_bytes() == reader.read_file(snapshots[0], snapshots[0].files[0])


# -- the training step of a sync snapshot ---------------------------------------------------------


def _torch_file(**state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/runner-step-pwned",))


def test_step_keys_are_read_without_running_code_from_the_file_or_reading_tensors():
    from runner.supervisor.syncdir.files import keys_in

    good = _torch_file(model={"w": torch.randn(1000)}, iter_num=42, best_val_loss=torch.tensor(1.5),
                       trainer={"global_step": 7}, step=True)
    assert keys_in(good, ("iter_num", "trainer.global_step", "step", "missing")) == \
        {"iter_num": 42, "trainer.global_step": 7}  # a bool is not a step  # fmt: skip
    assert keys_in(_torch_file(iter_num=3, x=_Evil()), ("iter_num",)) == {}
    assert not os.path.exists("/tmp/runner-step-pwned")
    assert keys_in(good[:-30], ("iter_num",)) == {} and keys_in(b"not a zip", ("iter_num",)) == {}


def test_step_rules_and_their_order():
    from runner.supervisor.syncdir.files import file_step, parse_step_rule, step_from_folder

    assert step_from_folder("output/checkpoint-500/optimizer.pt") == 500
    assert step_from_folder("run3/ckpt.pt") is None and step_from_folder("ckpt.pt") is None
    key, regex = parse_step_rule("iter_num"), parse_step_rule(r"snap-(\d+)/")
    assert key.key == "iter_num" and regex.regex is not None
    # The user's rule first, then the file name, a checkpoint-N folder, then a key inside the file.
    assert file_step("G_2333.pth", {"step": 9}, None, True) == (0, 2333)
    assert file_step("checkpoint-500/optimizer.pt", {}, None, True) == (0, 500)
    assert file_step("ckpt.pt", {"iter_num": 250}, None, True) == (0, 250)
    assert file_step("G_2333.pth", {"iter_num": 9}, key, True) == (1, 9)
    assert file_step("snap-77/state.bin", {}, regex, False) == (1, 77)
    assert file_step("events.out.tfevents.1700000000.host", {}, None, False) is None
    for bad in ["", "(", r"ckpt_\d+\.pt", r"(a)(b)"]:
        with pytest.raises(ValueError):
            parse_step_rule(bad)


def _settled_tick(ds: DirSync):
    """Commit a change to a file that is not a checkpoint: seen once, unchanged a settle period later."""
    assert ds.tick() is None
    time.sleep(0.1)
    ds.request()
    return ds.tick()


def test_a_snapshots_step_comes_from_inside_ckpt_pt_and_from_a_user_regex(tmp_path):
    src = tmp_path / "out"
    src.mkdir()
    (src / "ckpt.pt").write_bytes(_torch_file(iter_num=250, w=torch.zeros(4)))
    ds = DirSync(Store(str(tmp_path / "bucket")), "r", src, keep_last=10, settle_s=0.05)
    assert ds.tick().step == 250
    (src / "ckpt.pt").write_bytes(_torch_file(iter_num=500, w=torch.zeros(4)))
    (src / "train.log").write_text("500\n")
    assert ds.tick().step == 500
    # A new instance: restored, then only the log changes: the step stays the one inside the restored ckpt.pt.
    dst = tmp_path / "dst"
    again = DirSync(Store(str(tmp_path / "bucket")), "r", dst, keep_last=10, settle_s=0.05)
    assert again.restore().step == 500
    (dst / "train.log").write_text("500\n501\n")
    assert _settled_tick(again).step == 500
    # A user's regex over paths.
    other = tmp_path / "other"
    (other / "snap-0042").mkdir(parents=True)
    (other / "snap-0042" / "state.bin").write_bytes(b"x")
    ds = DirSync(Store(str(tmp_path / "bucket2")), "r", other, keep_last=10, settle_s=0.05,
                 step_from=r"snap-(\d+)/")
    assert _settled_tick(ds).step == 42


def test_a_bad_sync_step_from_is_one_line_on_stderr(tmp_path):
    done = subprocess.run([PYTHON, "-m", "runner", "start", "--bucket", str(tmp_path / "b"), "--sync-dir",
                           str(tmp_path / "out"), "--sync-step-from", "ckpt_(", "--", "true"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("runner: error: invalid --sync-step-from:") and "regex" in lines[0], lines
