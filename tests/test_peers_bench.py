"""benchmarks/peers.py's pieces: the shaping proxy passes and counts bytes, the three methods round-trip a state.

No timing is asserted (timed unit tests are not allowed here): the proxy's cap
is set high enough that it never matters, and only bytes, request counts and
checksums are compared.
"""

from __future__ import annotations

import http.client
import io
import os
import urllib.parse

import pytest

from benchmarks import peers
from benchmarks._shaping_proxy import ShapingProxy, SinkServer, read_counters


def _conn(url: str) -> http.client.HTTPConnection:
    split = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(split.hostname, split.port, timeout=30)


def test_shaping_proxy_streams_bodies_both_ways_and_counts_them() -> None:
    with SinkServer() as sink, ShapingProxy(sink.url, rate_Bps=1e10, latency_s=0.0) as proxy:
        conn = _conn(proxy.url)
        conn.request("PUT", "/a", body=os.urandom(3_000_000))
        assert conn.getresponse().read() == b""
        conn.request("GET", "/a?bytes=2500000")
        body = conn.getresponse().read()
        conn.close()
        assert body == bytes(2_500_000)
        assert read_counters(proxy.url) == {"requests": 2, "bytes_up": 3_000_000, "bytes_down": 2_500_000}


def test_shaping_proxy_forwards_a_chunked_request_body_with_its_length() -> None:
    with SinkServer() as sink, ShapingProxy(sink.url) as proxy:
        conn = _conn(proxy.url)
        conn.request("PUT", "/c", body=iter([b"x" * 1000, b"y" * 24]), encode_chunked=True)
        conn.getresponse().read()
        conn.close()
        assert proxy.counters() == {"requests": 1, "bytes_up": 1024, "bytes_down": 0}


def test_boto3_multipart_upload_and_ranged_download_through_the_proxy(s3_env: dict[str, str]) -> None:
    import boto3

    data = os.urandom(9 * 1024 * 1024)  # over boto3's 8 MiB threshold: a multipart upload, ranged GETs
    with ShapingProxy(s3_env["AWS_ENDPOINT_URL"], rate_Bps=1e10, latency_s=0.001) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.url)
        client.create_bucket(Bucket="shaped")
        client.upload_fileobj(io.BytesIO(data), "shaped", "k")
        got = io.BytesIO()
        client.download_fileobj("shaped", "k", got)
        counted = proxy.counters()
    assert got.getvalue() == data
    assert counted["bytes_up"] >= len(data) and counted["bytes_down"] >= len(data)
    assert counted["requests"] >= 6  # create bucket; create, 2 parts, complete; HEAD + 2 ranged GETs


@pytest.mark.parametrize("method", peers.METHODS)
def test_each_method_restores_the_checksum_it_saved(method: str, tmp_path) -> None:
    saved = peers.build_state("big", 0.1, trained=True)  # 10 x Linear(64, 64) + Adam
    place = peers.Place("local", str(tmp_path), str(tmp_path), method)
    writer = peers.METHOD_CLASSES[method](place, saved.components)
    writer.prepare_save()
    stall, durable, written = writer.save(1)
    writer.close()
    assert 0 <= stall <= durable and written > 0

    fresh = peers.build_state("big", 0.1, trained=False)
    assert peers.checksum(fresh.components) != peers.checksum(saved.components)
    reader = peers.METHOD_CLASSES[method](place, fresh.components)
    reader.restore(1)
    reader.close()
    assert peers.checksum(fresh.components) == peers.checksum(saved.components)
    fresh.train_step()  # the restored state trains
