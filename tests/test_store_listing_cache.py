"""A Store's cached listings never hide an object created since (found by benchmarks/chaos.py).

`Store.list` fills fsspec's listing cache (s3fs's dircache) so that the sizes
it listed serve later reads without a HEAD each.  s3fs then answers `info` and
`exists` for a key in a cached folder from the cache alone: an object another
process created after the listing is "not found".  Seen in the campaign: the
supervisor listed the run's manifests at start, the child committed more, and
at the child's exit every new manifest read as "vanished" ("the child exited 0
without a final snapshot").  The same cache answered retention's last look
before deleting orphaned data: data a slow writer had just committed was
deleted.  Real moto server, a second writer through boto3.
"""

from __future__ import annotations

import boto3

from runner.checkpoint import layout, retention
from runner.checkpoint.reader import RunReader
from runner.storage import Store

RUN = "cache"


def _other_writer(env: dict[str, str], url: str, key: str, body: bytes) -> None:
    bucket, _, root = url[len("s3://"):].partition("/")
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).put_object(Bucket=bucket, Key=f"{root}/{key}", Body=body)


def test_an_object_created_after_a_listing_is_found_read_and_sized(s3_bucket_url, s3_env) -> None:
    store = Store(s3_bucket_url)
    store.write_bytes(f"{RUN}/manifests/a.json", b"A")
    assert [o.key for o in store.list(f"{RUN}/manifests/")] == [f"{RUN}/manifests/a.json"]
    _other_writer(s3_env, s3_bucket_url, f"{RUN}/manifests/b.json", b"BB")
    assert store.exists(f"{RUN}/manifests/b.json")
    assert store.size(f"{RUN}/manifests/b.json") == 2
    assert store.read_bytes(f"{RUN}/manifests/b.json") == b"BB"
    assert not store.exists(f"{RUN}/manifests/c.json")  # and what is not there is still not there


def test_retention_keeps_data_whose_manifest_appeared_after_its_plan(s3_bucket_url, s3_env) -> None:
    store = Store(s3_bucket_url)
    store.write_bytes(layout.manifest_key(RUN, layout.new_snapshot_id(2)), b"{}")  # the folder is listed, cached
    sid = layout.new_snapshot_id(4)
    store.write_bytes(layout.data_key(RUN, sid, "model.pt"), b"weights")  # a slow writer's data, no manifest yet
    reader = RunReader(store, RUN)
    gc = retention.plan(reader, retention.KeepLastN(3), orphan_age_s=0.0)
    assert gc.orphans == [sid]
    _other_writer(s3_env, s3_bucket_url, layout.manifest_key(RUN, sid), b"{}")  # the writer commits
    retention.apply(reader, gc)
    assert store.read_bytes(layout.data_key(RUN, sid, "model.pt")) == b"weights"
