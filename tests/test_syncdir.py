"""Directory-sync mode (`runner start --sync-dir DIR`, runner/supervisor/syncdir/).

End to end with real processes: a tiny trainer that checkpoints on its own
(`torch.save` bytes written slowly, in chunks, as `G_<step>.pth`) runs under a
real supervisor against a local folder and moto's S3 server.  In-process
tests cover restore fallback, carrying unchanged files across retention,
names, and what a dying child leaves behind.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from helpers import PYTHON
from runner import ops
from runner.checkpoint import RunReader, layout
from runner.checkpoint.manifest import Reason
from runner.storage import ObjectNotFoundError, Store, clear_caches
from runner.supervisor.config import StartConfig
from runner.supervisor.syncdir import (
    ENCODED_PREFIX,
    DirSync,
    decode_path,
    encode_path,
    step_from_name,
    zip_complete,
)
from supervisor_harness import RUN, manifests, start, supervisors  # noqa: F401  (fixture)

TRAINER = r'''
import argparse, hashlib, io, json, os, time
import torch

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--steps", type=int, default=0)          # 0: until stopped (no SIGTERM handler, like GPT-SoVITS)
p.add_argument("--every", type=float, default=0.3)
p.add_argument("--chunks", type=int, default=8)
p.add_argument("--chunk-sleep", type=float, default=0.03)
p.add_argument("--stall-at", type=int, default=0)        # pause half-way through this step's file ...
p.add_argument("--stall", type=float, default=0.0)       # ... for this long
p.add_argument("--crash-in", type=int, default=0)        # die half-way through this step's file ...
p.add_argument("--crash-once", default="")               # ... unless this marker exists (then create it)
args = p.parse_args()
os.makedirs(args.dir, exist_ok=True)
present = {n: hashlib.sha256(open(os.path.join(args.dir, n), "rb").read()).hexdigest()
           for n in sorted(os.listdir(args.dir)) if os.path.isfile(os.path.join(args.dir, n))}
print("start: " + json.dumps(present), flush=True)
step = max((int(n[2:-4]) for n in present if n.startswith("G_") and n.endswith(".pth")), default=0)
if step:  # resume the way GPT-SoVITS does: load the newest G_*.pth
    assert torch.load(os.path.join(args.dir, f"G_{step}.pth"), weights_only=True)["step"] == step
notes = os.path.join(args.dir, "notes for run #1.txt")
if not os.path.exists(notes):
    with open(notes, "w") as f:
        f.write("a file whose name needs encoding\n")
while args.steps == 0 or step < args.steps:
    step += 1
    buf = io.BytesIO()
    torch.save({"step": step, "w": torch.full((16384,), float(step))}, buf)
    data = buf.getvalue()
    size = -(-len(data) // args.chunks)
    with open(os.path.join(args.dir, f"G_{step}.pth"), "wb") as f:
        for i in range(0, len(data), size):
            f.write(data[i:i + size])
            f.flush()
            time.sleep(args.chunk_sleep)
            if step == args.stall_at and i < len(data) // 2 <= i + size:
                print(f"stalling in G_{step}.pth", flush=True)
                time.sleep(args.stall)
            if step == args.crash_in and i < len(data) // 2 <= i + size and not os.path.exists(args.crash_once):
                open(args.crash_once, "w").close()
                print(f"crashing in G_{step}.pth", flush=True)
                os._exit(3)
    with open(os.path.join(args.dir, "train.log"), "a") as f:
        f.write(f"step {step}\n")
    print(f"wrote G_{step}.pth {hashlib.sha256(data).hexdigest()}", flush=True)
    time.sleep(args.every)
print("trainer: done", flush=True)
'''

FAST = dict(sync_settle_s=0.5, sync_scan_s=0.2, sync_interval_s=60.0)


def _trainer(tmp_path: Path, directory: Path, *args: str) -> list[str]:
    script = tmp_path / "sync_trainer.py"
    if not script.exists():
        script.write_text(TRAINER)
    return [PYTHON, str(script), str(directory), *args]


def _written(output: str) -> dict[str, str]:
    return dict(re.findall(r"wrote (G_\d+\.pth) ([0-9a-f]{64})", output))


def _g_steps(manifest) -> list[int]:
    return sorted(int(m.group(1)) for f in manifest.files if (m := re.fullmatch(r"G_(\d+)\.pth", f.path)))


def _contents(reader: RunReader, manifest) -> dict[str, bytes]:
    return {decode_path(f.path): reader.read_file(manifest, f) for f in manifest.files}


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- end to end -----------------------------------------------------------------------------


def test_settled_files_become_sync_snapshots_a_half_written_file_never_does_nor_trips_the_restart(
        tmp_path, supervisors):
    bucket, logs = str(tmp_path / "bucket"), tmp_path / "logs"
    command = _trainer(tmp_path, logs, "--steps", "6", "--stall-at", "3", "--stall", "1.5", "--crash-in", "5",
                       "--crash-once", str(tmp_path / "crashed"))
    sup = start(supervisors, tmp_path, bucket, [], command=command, sync_dir=str(logs), keep_last=100, **FAST)
    assert sup.finish(60) == 0, sup.output
    # The crash left half of G_5.pth; the restarted trainer loads its newest G_*.pth, so it had to be moved away.
    assert "crashing in G_5.pth" in sup.output and "restart 1/" in sup.output
    assert re.search(r"G_5\.pth is half-written .* moved to .*\.runner-partial/G_5\.pth", sup.output)
    written = _written(sup.output)
    assert sorted(written) == [f"G_{k}.pth" for k in range(1, 7)]

    snapshots = manifests(bucket)  # newest first
    reader = RunReader(Store(bucket), RUN)
    assert snapshots[0].reason is Reason.FINAL
    assert all(m.reason in (Reason.SYNC, Reason.FINAL) for m in snapshots)
    assert sum(m.reason is Reason.SYNC for m in snapshots) >= 3, sup.output  # synced while it trained
    # Every uploaded G file is whole: the exact bytes the trainer finished, loadable, of its own step.
    for manifest in snapshots:
        for name, data in _contents(reader, manifest).items():
            if name.startswith("G_"):
                assert hashlib.sha256(data).hexdigest() == written[name], (manifest.snapshot_id, name)
                assert torch.load(io.BytesIO(data), weights_only=True)["step"] == int(name[2:-4])
        assert manifest.step == max(_g_steps(manifest), default=0) or not _g_steps(manifest)
    # While G_3.pth sat half-written for longer than the settle period, snapshots went on without it.
    assert any(_g_steps(m) == [1, 2] for m in snapshots), [_g_steps(m) for m in snapshots]
    assert "unfinished torch checkpoint" not in sup.output
    # The final snapshot is the whole folder, byte for byte, an encoded name included.
    assert _contents(reader, snapshots[0]) == {k: v for k, v in _files(logs).items() if ".runner-" not in k}
    assert any(f.path.startswith(ENCODED_PREFIX) for f in snapshots[0].files)


def test_sigterm_syncs_then_stops_the_child_exit_75_and_a_fresh_dir_is_restored_before_the_child_starts(
        tmp_path, supervisors, s3_bucket_url):
    first = tmp_path / "first" / "logs"
    sup = start(supervisors, tmp_path, s3_bucket_url, [], name="a", command=_trainer(tmp_path, first),
                sync_dir=str(first), keep_last=2, **FAST)  # fmt: skip
    sup.wait_for(r"wrote G_4\.pth")
    sup.wait_for(r"sync snapshot \S+ committed \(step ([4-9]|\d\d)\)")
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.finish(30) == 75, sup.output
    assert "SIGTERM to the child's process group" in sup.output
    assert re.search(r"sync snapshot \S+ holds .* preempted", sup.output)
    written = _written(sup.output)

    store = Store(s3_bucket_url)
    reader = RunReader(store, RUN)
    snapshots = manifests(s3_bucket_url)
    assert len(snapshots) == 2  # keep_last
    data_prefixes = {layout.snapshot_id_from_data_key(RUN, o.key) for o in store.list(layout.data_prefix(RUN))}
    assert data_prefixes == {m.snapshot_id for m in snapshots}  # retention deleted the data too
    newest = snapshots[0]
    assert newest.reason is Reason.SYNC and newest.step >= 4
    assert _g_steps(newest) == list(range(1, newest.step + 1))
    saved = _contents(reader, newest)
    for name, data in saved.items():
        if name.startswith("G_"):
            assert hashlib.sha256(data).hexdigest() == written[name]

    # A new instance: an empty folder.  The child finds the files before its first line runs.
    second = tmp_path / "second" / "logs"
    sup2 = start(supervisors, tmp_path, s3_bucket_url, [], name="b",
                 command=_trainer(tmp_path, second, "--steps", str(newest.step + 2)),
                 sync_dir=str(second), keep_last=2, **FAST)  # fmt: skip
    assert sup2.finish(60) == 0, sup2.output
    assert re.search(rf"restored .* from sync snapshot {newest.snapshot_id}", sup2.output)
    seen_at_start = json.loads(sup2.wait_for(r"^start: (.*)$").group(1))
    assert seen_at_start == {name: hashlib.sha256(data).hexdigest() for name, data in saved.items()}
    assert f"wrote G_{newest.step + 1}.pth" in sup2.output  # it resumed after the restored step
    clear_caches()
    final = manifests(s3_bucket_url)[0]
    assert final.final and final.step == newest.step + 2

    # The run is finished: a third start does nothing.
    sup3 = start(supervisors, tmp_path, s3_bucket_url, [], name="c", command=_trainer(tmp_path, tmp_path / "third"),
                 sync_dir=str(tmp_path / "third"), **FAST)  # fmt: skip
    assert sup3.finish(30) == 0
    assert "already finished" in sup3.output and "start:" not in sup3.output


def test_a_sync_dir_that_is_a_file_is_a_usage_error(tmp_path, supervisors):
    not_a_dir = tmp_path / "logs"
    not_a_dir.write_text("x")
    sup = start(supervisors, tmp_path, str(tmp_path / "bucket"), [], command=["true"], sync_dir=str(not_a_dir))
    assert sup.finish(30) == 2
    assert re.search(r"runner: error: --sync-dir .* is not a folder", sup.output)


# -- in process -------------------------------------------------------------------------------


def _torch_bytes(step: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"step": step, "w": torch.full((256,), float(step))}, buf)
    return buf.getvalue()


def _sync_now(ds: DirSync):
    return ds.final_sync(until=lambda: time.monotonic() + 5, wait=time.sleep, alive=lambda: True)


def test_a_corrupt_newest_sync_snapshot_falls_back_to_the_previous_one_whole(tmp_path, caplog):
    store = Store(str(tmp_path / "bucket"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "G_1.pth").write_bytes(_torch_bytes(1))
    (src / "a b.txt").write_text("one")
    ds = DirSync(store, "r", src, keep_last=10, settle_s=0.05)
    older = _sync_now(ds)
    (src / "G_2.pth").write_bytes(_torch_bytes(2))
    (src / "a b.txt").write_text("two")
    newer = _sync_now(ds)
    assert (older.step, newer.step) == (1, 2) and newer.parent == older.snapshot_id
    # Flip a byte of the newer snapshot's LAST file (same size: only the checksum can tell).
    last = newer.files[-1]
    assert decode_path(last.path) == "a b.txt"
    damaged = Path(store.path(layout.data_key("r", newer.snapshot_id, last.path)))
    damaged.write_bytes(b"TWO")

    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "a b.txt").write_text("one")  # already what the older snapshot holds: left alone
    (dst / "keep.me").write_text("mine")  # not in any snapshot: never deleted
    (dst / "G_9.pth").write_bytes(_torch_bytes(9)[:500])  # left by a trainer killed mid-save: out of the way
    inode = (dst / "a b.txt").stat().st_ino
    caplog.set_level("INFO", logger="runner")
    restored = DirSync(store, "r", dst, keep_last=10).restore()
    assert restored is not None and restored.snapshot_id == older.snapshot_id
    assert f"sync snapshot {newer.snapshot_id} is corrupt" in caplog.text
    # The newer G_2.pth was downloaded and checked before the bad file was found: it must not have landed.
    assert _files(dst) == {"G_1.pth": _torch_bytes(1), "a b.txt": b"one", "keep.me": b"mine",
                           ".runner-partial/G_9.pth": _torch_bytes(9)[:500]}
    assert (dst / "a b.txt").stat().st_ino == inode
    assert "1 file(s) downloaded" in caplog.text and "1 already present" in caplog.text


def test_unchanged_files_are_copied_so_retention_never_breaks_a_kept_snapshot_and_verify_and_fork_work(
        tmp_path, bucket_url):
    store = Store(bucket_url)
    src = tmp_path / "src"
    src.mkdir()
    (src / "D_1.pth").write_bytes(_torch_bytes(1))
    (src / "sub").mkdir()
    (src / "sub" / "G_1.pth").write_bytes(_torch_bytes(1))
    ds = DirSync(store, "r", src, keep_last=1, settle_s=0.05)
    first = _sync_now(ds)
    (src / "sub" / "G_7.pth").write_bytes(_torch_bytes(7))
    second = _sync_now(ds)
    reader = RunReader(store, "r")
    assert [m.snapshot_id for m in reader.valid_snapshots()] == [second.snapshot_id]  # keep_last=1
    assert not store.list(layout.data_prefix("r", first.snapshot_id))
    assert reader.verify(second) is None
    assert sorted(decode_path(f.path) for f in second.files) == ["D_1.pth", "sub/G_1.pth", "sub/G_7.pth"]
    assert second.step == 7
    assert _sync_now(ds).snapshot_id == second.snapshot_id  # nothing changed: nothing committed
    # The operator tools need nothing special: verify reads it, a fork restores like the original.
    assert [r.valid for r in ops.verify(reader, list(reader.statuses()))] == [True]
    forked = ops.fork(store, "r", None, "r2")
    dst = tmp_path / "dst"
    assert DirSync(store, "r2", dst, keep_last=1).restore().snapshot_id == forked.snapshot_id
    assert _files(dst) == _files(src)


def test_store_copy_copies_inside_the_store_and_says_when_the_source_is_gone(bucket_url):
    store = Store(bucket_url)
    store.write_bytes("r/data/a/x.pth", b"bytes")
    store.copy("r/data/a/x.pth", "r/data/b/sub/x.pth")
    assert store.read_bytes("r/data/b/sub/x.pth") == b"bytes"
    assert [o.key for o in store.list("r/data/b/")] == ["r/data/b/sub/x.pth"]
    with pytest.raises(ObjectNotFoundError):
        store.copy("r/data/a/missing.pth", "r/data/c/missing.pth")
    assert not store.list("r/data/c/")


def test_what_the_child_was_writing_when_it_died_is_not_synced_and_is_taken_out_of_the_restarts_way(tmp_path):
    store = Store(str(tmp_path / "bucket"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "G_1.pth").write_bytes(_torch_bytes(1))
    (src / "G_latest.pth").write_bytes(_torch_bytes(1))  # rewritten in place at every save
    ds = DirSync(store, "r", src, keep_last=10, settle_s=0.3)
    _sync_now(ds)
    # The child is killed half-way through two saves and a log line.
    (src / "G_2.pth").write_bytes(_torch_bytes(2)[:1000])
    (src / "G_latest.pth").write_bytes(_torch_bytes(2)[:1000])
    (src / "train.log").write_text("step 2\n")
    assert ds.after_exit(clean=False) is None  # nothing settled changed
    assert (src / "G_latest.pth").read_bytes() == _torch_bytes(1)  # put back to its synced version
    assert not (src / "G_2.pth").exists()
    assert (src / ".runner-partial" / "G_2.pth").read_bytes() == _torch_bytes(2)[:1000]
    time.sleep(0.4)  # train.log looks settled by time now, but it is the state the child died in
    ds.request()
    assert ds.tick() is None
    (src / "train.log").write_text("step 2\nstep 3\n")  # the restarted child writes it again
    assert ds.tick() is None  # seen changing
    time.sleep(0.4)
    ds.request()
    committed = ds.tick()
    assert committed is not None
    assert sorted(decode_path(f.path) for f in committed.files) == ["G_1.pth", "G_latest.pth", "train.log"]


def test_names_are_encoded_reversibly_and_hostile_names_are_refused():
    for rel in ["G_2333.pth", "eval/G_1.pth", "notes for run #1.txt", "épocas/モデル.pth", ".hidden", "-dash",
                "epoch=9-step=1000.ckpt", f"{ENCODED_PREFIX}looks-encoded", "dir with space/x.pth"]:
        stored = encode_path(rel)
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*", stored), stored
        assert decode_path(stored) == rel
    assert encode_path("G_2333.pth") == "G_2333.pth"
    def encoded(name: str) -> str:
        return ENCODED_PREFIX + base64.b32encode(name.encode()).decode().rstrip("=").lower()

    for hostile in ["..", "a//b", "/etc/passwd", encoded(".."), encoded("a/b"), encoded("x\0y"), encoded(""),
                    ENCODED_PREFIX + "not base32!"]:
        with pytest.raises(ValueError):
            decode_path(hostile)


def test_step_from_name_and_zip_completeness():
    assert step_from_name("G_2333.pth") == 2333
    assert step_from_name("logs/epoch=9-step=1000.ckpt") == 1000
    assert step_from_name("G_233333333333.pth") == 233333333333
    assert step_from_name("x_99999999999999.pth") is None
    assert step_from_name("latest.pth") is None
    data = _torch_bytes(3)
    assert zip_complete(data) and zip_complete(b"not a zip")
    assert not any(zip_complete(data[:n]) for n in range(4, len(data), 97))


def test_sync_signal_is_validated():
    base = dict(bucket="/tmp/b", command=["x"])
    assert StartConfig(**base).sync_signal == "SIGTERM"
    assert StartConfig(**base, sync_signal="int").sync_signal_number == signal.SIGINT
    assert StartConfig(**base, sync_signal="9").sync_signal == "SIGKILL"
    with pytest.raises(ValueError):
        StartConfig(**base, sync_signal="SIGNOPE")
