"""A periodic save and `save(final=True)` at the same step leave one snapshot, the final one.

The usual loop ends with `ckpt.step(total)` (a periodic save is due there)
and `ckpt.save(total, final=True)`.  While the periodic upload is still in
flight it is committed as the final snapshot (one manifest written); once
committed, the final save writes its own and removes the periodic one.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import runner
import tiny_training as tiny
from flaky_proxy import FlakyProxy
from runner.checkpoint.manifest import Reason
from runner.checkpoint.reader import RunReader
from runner.storage import clear_caches


def _snapshots(url: str) -> list[tuple[int, str]]:
    clear_caches()
    reader = RunReader(runner.Checkpointer(url, "exp", **tiny.build().components()).store, "exp")
    return [(m.step, m.reason.value) for m in reader.valid_snapshots()]


def test_a_final_save_at_the_step_of_a_periodic_save_in_flight_commits_that_one_as_final(
        s3_bucket_url: str, s3_env: dict[str, str], monkeypatch) -> None:
    release = threading.Event()
    held = threading.Event()

    def hold(method: str, path: str) -> None:  # keep step 4's data upload in flight until save() is called
        if method == "PUT" and "/data/000000000004-" in path and not release.is_set():
            held.set()
            release.wait(30)

    with FlakyProxy(s3_env["AWS_ENDPOINT_URL"], hold=hold) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        clear_caches()
        parts = tiny.build()
        ckpt = runner.Checkpointer(s3_bucket_url, "exp", save_every_steps=2, **parts.components())
        for step in range(1, 5):
            tiny.train_step(parts)
            ckpt.step(step, epoch=0)
        assert held.wait(30)
        threading.Timer(0.3, release.set).start()
        result = ckpt.save(4, final=True, epoch=1, metrics={"loss": 0.5})
        ckpt.close()
        manifest_puts = [line for line in proxy.log if line.startswith("PUT") and "/manifests/" in line]
    assert result.manifest.step == 4 and result.manifest.reason is Reason.FINAL
    assert result.manifest.epoch == 1 and result.manifest.metrics == {"loss": 0.5}
    assert ckpt.finished
    assert len(manifest_puts) == 2, manifest_puts  # steps 2 and 4: nothing written twice
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env["AWS_ENDPOINT_URL"])
    assert _snapshots(s3_bucket_url) == [(4, "final"), (2, "periodic")]


@pytest.mark.parametrize("pinned", [False, True])
def test_a_final_save_after_the_periodic_one_committed_removes_it_unless_pinned(tmp_path: Path, pinned: bool) -> None:
    url = str(tmp_path / "bucket")
    parts = tiny.build()
    ckpt = runner.Checkpointer(url, "exp", save_every_steps=2, async_save=False, **parts.components())
    for step in range(1, 5):
        tiny.train_step(parts)
        ckpt.step(step)
    assert ckpt.last_commit.manifest.reason is Reason.PERIODIC and ckpt.last_commit.manifest.step == 4
    if pinned:
        ckpt.pin(ckpt.last_commit.manifest.snapshot_id)
    ckpt.save(4, final=True)
    ckpt.close()
    kept = [(4, "final"), (4, "periodic")] if pinned else [(4, "final")]
    assert _snapshots(url) == [*kept, (2, "periodic")]


def test_a_final_save_at_another_step_keeps_the_periodic_one(tmp_path: Path) -> None:
    url = str(tmp_path / "bucket")
    parts = tiny.build()
    ckpt = runner.Checkpointer(url, "exp", save_every_steps=2, **parts.components())
    for step in range(1, 4):
        tiny.train_step(parts)
        ckpt.step(step)
    ckpt.save(3, final=True)
    ckpt.close()
    assert _snapshots(url) == [(3, "final"), (2, "periodic")]


def test_the_superseded_periodic_snapshot_does_not_count_towards_keep_last(tmp_path: Path) -> None:
    # 8 steps, a save every 2, keep 3: the final save at step 8 replaces step 8's periodic one, and
    # retention keeps 3 snapshots (8 final, 6, 4), not 2.
    url = str(tmp_path / "bucket")
    parts = tiny.build()
    ckpt = runner.Checkpointer(url, "exp", save_every_steps=2, keep_last=3, async_save=False, **parts.components())
    for step in range(1, 9):
        tiny.train_step(parts)
        ckpt.step(step)
    ckpt.save(8, final=True)
    ckpt.close()
    assert _snapshots(url) == [(8, "final"), (6, "periodic"), (4, "periodic")]
