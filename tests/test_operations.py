"""The operator commands' logic (runner/ops/) against real snapshots.

Snapshots are made by a real `Checkpointer` over a tiny torch model, in a
local folder, `memory://` and the moto S3 server.
"""

from __future__ import annotations

import os
import time

import boto3
import pytest
import torch

from runner import Checkpointer
from runner import ops
from runner.checkpoint import layout
from runner.errors import ConfigError, SnapshotNotFoundError
from runner.storage import Store, StoreNotFoundError


def make_run(url: str, run_id: str = "exp1", steps=(1, 2, 3), final: bool = False) -> torch.nn.Module:
    """A run with one snapshot per step; returns the model as of the last one."""
    torch.manual_seed(sum(steps))
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(url, run_id, model=model, optimizer=opt, async_save=False, keep_last=100)
    for step in steps:
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpt.save(step, epoch=step // 2, final=final and step == steps[-1])
    ckpt.close()
    return model


def reader(url: str, run_id: str = "exp1"):
    return ops.open_run(ops.open_store(url), run_id)


def corrupt(url: str, snapshot_id: str, file: str = "model.pt", run_id: str = "exp1", truncate: bool = False) -> None:
    store = Store(url)
    key = layout.data_key(run_id, snapshot_id, file)
    data = bytearray(store.read_bytes(key))
    if truncate:
        data = data[:-7]
    else:
        data[len(data) // 2] ^= 0xFF
    store.write_bytes(key, bytes(data))


class Recorder:
    def __init__(self):
        self.total = 0
        self.done = 0

    def begin(self, description: str, total: int) -> None:
        self.total, self.done = total, 0

    def advance(self, n: int) -> None:
        self.done += n


# -- ls -------------------------------------------------------------------


def test_runs_and_snapshot_rows_show_lineage_pins_and_final(bucket_url):
    make_run(bucket_url, "exp1", steps=(1, 2), final=True)
    make_run(bucket_url, "exp2", steps=(5,))
    store = ops.open_store(bucket_url)
    summaries = {s.run_id: s for s in ops.list_runs(store)}
    assert sorted(summaries) == ["exp1", "exp2"]
    assert (summaries["exp1"].snapshots, summaries["exp1"].newest_step, summaries["exp1"].final) == (2, 2, True)
    assert (summaries["exp2"].snapshots, summaries["exp2"].newest_step, summaries["exp2"].final) == (1, 5, False)

    rows = ops.snapshot_rows(ops.open_run(store, "exp1"))
    assert [r.step for r in rows] == [2, 1]
    assert rows[0].parent == rows[1].snapshot_id and rows[1].parent is None
    assert rows[0].final and rows[0].reason == "final" and all(r.valid for r in rows)
    assert rows[0].files == 3 and rows[0].size_bytes > 0


def test_a_local_bucket_that_does_not_exist_is_an_error_and_is_not_created(tmp_path):
    with pytest.raises(StoreNotFoundError):
        ops.open_store(str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()


def test_an_empty_bucket_has_no_runs(tmp_path):
    assert ops.list_runs(ops.open_store(str(tmp_path))) == []


# -- verify ---------------------------------------------------------------


def test_verify_reads_every_byte_and_names_the_altered_and_the_truncated_file(tmp_path):
    url = str(tmp_path)
    make_run(url)
    r = reader(url)
    newest, middle, oldest = r.snapshot_ids()
    corrupt(url, newest)
    corrupt(url, middle, file="optimizer.pt", truncate=True)
    progress = Recorder()
    results = ops.verify(r, ops.select_snapshots(r), progress)
    assert [res.valid for res in results] == [False, False, True]
    assert results[0].problems == ["model.pt does not match its checksum"]
    assert "optimizer.pt has" in results[1].problems[0]
    assert progress.done == progress.total > 0


def test_select_snapshots_by_id_latest_and_unknown(tmp_path):
    url = str(tmp_path)
    make_run(url)
    r = reader(url)
    ids = r.snapshot_ids()
    assert [s.snapshot_id for s in ops.select_snapshots(r, ids[1])] == [ids[1]]
    assert [s.snapshot_id for s in ops.select_snapshots(r, "latest")] == [ids[0]]
    with pytest.raises(SnapshotNotFoundError):
        ops.select_snapshots(r, "000000000009-20200101T000000-abcdef")
    with pytest.raises(ConfigError):
        ops.select_snapshots(r, "not-an-id")
    with pytest.raises(SnapshotNotFoundError, match="no snapshots"):
        ops.select_snapshots(reader(url, "nobody"))


# -- gc -------------------------------------------------------------------


def test_gc_dry_run_lists_and_deletes_nothing(bucket_url):
    make_run(bucket_url, steps=(1, 2, 3, 4))
    r = reader(bucket_url)
    before = [o.key for o in r.store.list("")]
    report = ops.gc(r, keep_last=2, dry_run=True)
    assert [m.step for m in report.deleted] == [2, 1]
    assert report.aborted_uploads is None and report.objects_deleted == 0
    assert [o.key for o in r.store.list("")] == before


def test_gc_keeps_newest_k_and_pinned(bucket_url):
    make_run(bucket_url, steps=(1, 2, 3, 4))
    r = reader(bucket_url)
    ids = r.snapshot_ids()
    ops.pin(r, ids[3])  # step 1
    report = ops.gc(r, keep_last=2)
    assert [m.step for m in report.deleted] == [2]
    assert r.snapshot_ids() == [ids[0], ids[1], ids[3]]
    assert not r.store.list(layout.data_prefix("exp1", ids[2]))


def test_gc_never_deletes_the_newest_valid_even_when_newer_ones_are_invalid(tmp_path):
    url = str(tmp_path)
    make_run(url, steps=(1, 2, 3))
    r = reader(url)
    newest, middle, oldest = r.snapshot_ids()
    Store(url).delete([layout.data_key("exp1", newest, "model.pt")])  # newest: shallow-invalid
    report = ops.gc(r, keep_last=1)
    assert [m.snapshot_id for m in report.deleted] == [oldest]
    assert report.kept == [middle] and newest in report.invalid
    assert r.snapshot_ids() == [newest, middle]


def test_gc_refuses_when_every_kept_snapshot_is_corrupt(tmp_path):
    url = str(tmp_path)
    make_run(url, steps=(1, 2))
    r = reader(url)
    newest, oldest = r.snapshot_ids()
    corrupt(url, newest)  # passes the shallow check, fails the deep one
    with pytest.raises(ops.RefusedError, match="nothing was deleted"):
        ops.gc(r, keep_last=1)
    assert r.snapshot_ids() == [newest, oldest]


def test_gc_sweeps_orphaned_data_older_than_the_orphan_age_only(tmp_path):
    url = str(tmp_path)
    make_run(url, steps=(1,))
    store = Store(url)
    old, young = layout.new_snapshot_id(7), layout.new_snapshot_id(8)
    for sid in (old, young):
        store.write_bytes(layout.data_key("exp1", sid, "model.pt"), b"partial")
    past = time.time() - 7200
    os.utime(os.path.join(url, layout.data_key("exp1", old, "model.pt")), (past, past))
    report = ops.gc(reader(url), keep_last=3, orphan_age_s=3600)
    assert report.orphans == [old]
    assert not store.list(layout.data_prefix("exp1", old))
    assert store.list(layout.data_prefix("exp1", young))


def test_gc_aborts_stale_multipart_uploads_under_the_run(s3_bucket_url, s3_env):
    make_run(s3_bucket_url, steps=(1,))
    bucket = s3_bucket_url.split("/")[2]
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    s3.create_multipart_upload(Bucket=bucket, Key="runs/exp1/data/x/model.pt")
    s3.create_multipart_upload(Bucket=bucket, Key="runs/other/data/x/model.pt")
    # moto reports every upload as initiated in 2010, so "young" ones cannot be shown here.
    assert ops.gc(reader(s3_bucket_url), keep_last=3, dry_run=True).aborted_uploads is None
    assert len(s3.list_multipart_uploads(Bucket=bucket)["Uploads"]) == 2
    assert ops.gc(reader(s3_bucket_url), keep_last=3, orphan_age_s=3600).aborted_uploads == 1
    left = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["runs/other/data/x/model.pt"]


# -- pin ------------------------------------------------------------------


def test_pin_latest_unpin_and_refusals(tmp_path):
    url = str(tmp_path)
    make_run(url, steps=(1, 2))
    r = reader(url)
    newest, oldest = r.snapshot_ids()
    assert ops.pin(r, "latest") == ops.PinResult(newest, True, True)
    assert ops.pin(r, newest).changed is False
    assert r.pinned() == {newest}
    assert ops.unpin(r, newest) == ops.PinResult(newest, False, True)
    assert ops.unpin(r, oldest).changed is False
    Store(url).delete([layout.data_key("exp1", oldest, "model.pt")])
    with pytest.raises(ops.RefusedError, match="not valid"):
        ops.pin(r, oldest)
    with pytest.raises(SnapshotNotFoundError):
        ops.pin(r, "000000000009-20200101T000000-abcdef")


# -- fork -----------------------------------------------------------------


def _restored(url: str, run_id: str) -> tuple[int, torch.nn.Module, Checkpointer]:
    model = torch.nn.Linear(4, 2)
    ckpt = Checkpointer(url, run_id, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        async_save=False)
    return ckpt.restore(), model, ckpt


def test_fork_copies_the_newest_valid_snapshot_and_the_new_run_restores_it(bucket_url):
    source_model = make_run(bucket_url, steps=(1, 2), final=True)
    store = ops.open_store(bucket_url)
    src = reader(bucket_url).snapshot_ids()
    progress = Recorder()
    manifest = ops.fork(store, "exp1", None, "exp2", progress)
    assert manifest.forked_from == f"exp1@{src[0]}" and manifest.parent is None
    assert manifest.reason.value == "manual" and manifest.step == 2
    original = reader(bucket_url).load_manifest(src[0])
    assert [(f.path, f.component, f.sha256) for f in manifest.files] == \
        [(f.path, f.component, f.sha256) for f in original.files]
    assert progress.done == progress.total == original.total_bytes

    step, model, ckpt = _restored(bucket_url, "exp2")
    assert step == 2 and not ckpt.finished
    assert torch.equal(model.weight, source_model.weight) and torch.equal(model.bias, source_model.bias)
    ckpt.save(3)  # the fork trains on: its next snapshot's parent is the forked one
    assert reader(bucket_url, "exp2").newest_valid().parent == manifest.snapshot_id
    ckpt.close()


def test_fork_of_a_named_snapshot_and_refusals(tmp_path):
    url = str(tmp_path)
    make_run(url, steps=(1, 2))
    store = ops.open_store(url)
    newest, oldest = reader(url).snapshot_ids()
    assert ops.fork(store, "exp1", oldest, "exp2").forked_from == f"exp1@{oldest}"
    with pytest.raises(ops.RefusedError, match="already has snapshots"):
        ops.fork(store, "exp1", None, "exp2")
    with pytest.raises(ConfigError):
        ops.fork(store, "exp1", None, "exp1")
    corrupt(url, newest)
    with pytest.raises(ops.RefusedError, match="corrupt"):
        ops.fork(store, "exp1", newest, "exp3")
    # Unnamed: the corrupt newest is skipped with a warning, the older one is forked.
    assert ops.fork(store, "exp1", None, "exp4").forked_from == f"exp1@{oldest}"
    with pytest.raises(SnapshotNotFoundError):
        ops.fork(store, "nobody", None, "exp5")


def test_parse_source():
    assert ops.parse_source("exp1") == ("exp1", None)
    assert ops.parse_source("exp1@latest") == ("exp1", "latest")
    with pytest.raises(ConfigError):
        ops.parse_source("exp1@bogus")
    with pytest.raises(ConfigError):
        ops.parse_source("../x")
