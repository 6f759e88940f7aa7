"""One writer per run: the lease in the bucket, on a local folder and on S3."""

from __future__ import annotations

import threading
import time

import pytest

from runner.control import lease
from runner.storage import Store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    url = str(tmp_path / "bucket") if request.param == "local" else request.getfixturevalue("s3_bucket_url")
    s = Store(url)
    s.check()
    return s


def test_first_acquire_gets_generation_one(store):
    a = lease.Lease(store, "run", holder="a")
    assert a.try_acquire() is None
    assert a.generation == 1
    assert lease.current(store, "run").holder == "a"


def test_second_contender_is_told_who_holds_the_run(store):
    a = lease.Lease(store, "run", holder="a")
    b = lease.Lease(store, "run", holder="b")
    a.try_acquire()
    holder = b.try_acquire()
    assert holder is not None and holder.holder == "a"
    assert b.generation is None
    with pytest.raises(lease.LeaseLostError, match="held by a"):
        b.acquire(wait=False)


def test_concurrent_contenders_exactly_one_wins(store):
    contenders = [lease.Lease(store, "run", holder=f"h{i}") for i in range(6)]
    barrier = threading.Barrier(len(contenders))
    results = {}

    def race(c):
        barrier.wait()
        results[c.holder] = c.try_acquire()

    threads = [threading.Thread(target=race, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [c for c in contenders if c.generation is not None]
    assert len(winners) == 1
    assert lease.generations(store, "run") == [1]


def test_expired_lease_is_taken_over_and_the_old_holder_is_fenced(store):
    a = lease.Lease(store, "run", ttl_s=60, holder="a")
    b = lease.Lease(store, "run", ttl_s=60, holder="b")
    now = time.time()
    a.try_acquire(now=now)
    assert b.try_acquire(now=now + 30) is not None  # still held
    assert b.try_acquire(now=now + 61) is None  # expired: taken over
    assert b.generation == 2
    assert not lease.is_current(store, "run", 1)
    assert lease.is_current(store, "run", 2)
    with pytest.raises(lease.LeaseLostError, match="newer holder"):
        a.renew()


def test_renew_keeps_the_lease(store):
    a = lease.Lease(store, "run", ttl_s=60, holder="a")
    b = lease.Lease(store, "run", ttl_s=60, holder="b")
    now = time.time()
    a.try_acquire(now=now)
    a.renew(now=now + 50)
    assert b.try_acquire(now=now + 70) is not None  # renewed until now+110
    assert lease.current(store, "run").expires_at == pytest.approx(now + 110)


def test_release_lets_the_next_instance_in_at_once(store):
    a = lease.Lease(store, "run", ttl_s=600, holder="a")
    b = lease.Lease(store, "run", ttl_s=600, holder="b")
    a.try_acquire()
    a.release()
    assert b.try_acquire() is None
    assert b.generation == 2


def test_garbled_record_does_not_block_the_run_forever(store):
    store.write_bytes(lease.lease_key("run", 1), b"{not json")
    b = lease.Lease(store, "run", holder="b")
    assert b.try_acquire() is None
    assert b.generation == 2


def test_a_fenced_training_process_commits_nothing(tmp_path, monkeypatch):
    """A Checkpointer whose lease generation is stale refuses to commit and asks to stop."""
    import torch

    import runner

    bucket = str(tmp_path / "bucket")
    store = Store(bucket)
    store.check()
    old = lease.Lease(store, "run", holder="old")
    old.try_acquire()
    monkeypatch.setenv(lease.ENV_LEASE_GENERATION, str(old.generation))
    model = torch.nn.Linear(2, 2)
    ckpt = runner.Checkpointer(bucket, run_id="run", save_every_steps=1, async_save=False, model=model)
    assert ckpt.step(1) is False  # still the holder: commits
    assert len(ckpt.reader.snapshot_ids()) == 1

    new = lease.Lease(store, "run", holder="new")
    store.write_bytes(lease.lease_key("run", 1), b'{"generation": 1, "holder": "old", "acquired_at": 0, "expires_at": 0}')
    assert new.try_acquire() is None and new.generation == 2
    assert ckpt.step(2) is True  # fenced: stop, commit nothing
    assert len(ckpt.reader.snapshot_ids()) == 1
    with pytest.raises(lease.LeaseLostError):
        ckpt.save(3)
    assert len(ckpt.reader.snapshot_ids()) == 1
    ckpt.close()
