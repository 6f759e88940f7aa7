"""Shared fixtures: a real S3 endpoint (moto's server on loopback) and clean caches.

One moto server serves the whole session; every test that uses it gets a
reset server (POST /moto-api/reset), a fresh bucket, and a cleared s3fs
instance cache, as s3fs's own test suite does.
"""

from __future__ import annotations

import logging
import os
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from runner import control
from runner.storage import clear_caches

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    # The server logs every request to stderr; tests that read stderr need quiet.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for the current process and for subprocesses that talk to moto."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST"), timeout=10)
    env = dict(S3_ENV, AWS_ENDPOINT_URL=moto_endpoint)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    clear_caches()
    return env


@pytest.fixture
def s3_bucket_url(s3_env: dict[str, str]) -> str:
    """`s3://<fresh bucket>/runs` on the moto server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return f"s3://{name}/runs"


@pytest.fixture(params=["local", "memory", "s3"])
def bucket_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """The storage contract runs against every backend."""
    if request.param == "local":
        return str(tmp_path / "bucket")
    if request.param == "memory":
        from fsspec.implementations.memory import MemoryFileSystem

        MemoryFileSystem.store.clear()
        MemoryFileSystem.pseudo_dirs[:] = [""]
        return f"memory://bucket-{uuid.uuid4().hex[:8]}"
    return request.getfixturevalue("s3_bucket_url")


@pytest.fixture(autouse=True)
def _clean_process_state() -> Iterator[None]:
    clear_caches()
    control.reset_for_tests()
    yield
    control.reset_for_tests()
