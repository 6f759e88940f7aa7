"""Shared fixtures: real S3 endpoints (moto's server, and s3rver, on loopback) and clean caches.

One moto server serves the whole session; every test that uses it gets a
reset server (POST /moto-api/reset), a fresh bucket, and a cleared s3fs
instance cache, as s3fs's own test suite does.

s3rver (a Node.js S3 server, npm package `s3rver`, installed into
tests/s3rver/node_modules by scripts/setup) is a second, independent S3
implementation: the storage contract (`storage_url`) runs on it too.  It ignores
`If-None-Match` on PutObject, so it is also the store on which the storage
layer must refuse exclusive creates.  One server per session, a fresh bucket
per test.  Without it its tests skip, unless CI=true, where they fail.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
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
    return _point_at(dict(S3_ENV, AWS_ENDPOINT_URL=moto_endpoint), monkeypatch)


def _point_at(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Set `env` (credentials, region, AWS_ENDPOINT_URL) for this process, drop other AWS identities; returns it."""
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


S3RVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "s3rver", "node_modules", ".bin", "s3rver")
# s3rver checks signatures against its one built-in key pair.
S3RVER_ENV = dict(S3_ENV, AWS_ACCESS_KEY_ID="S3RVER", AWS_SECRET_ACCESS_KEY="S3RVER")


@pytest.fixture(scope="session")
def s3rver_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not os.access(S3RVER, os.X_OK):
        reason = "s3rver is not installed (scripts/setup runs npm ci in tests/s3rver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}, and CI=true requires the second S3 implementation")
        pytest.skip(f"{reason}; in CI (CI=true) this is a failure")
    folder = tmp_path_factory.mktemp("s3rver")
    log_path = folder / "server.log"
    with open(log_path, "w") as log_file:  # a file, not a pipe: nobody has to drain it
        proc = subprocess.Popen([S3RVER, "--silent", "-a", "127.0.0.1", "-p", "0", "-d", str(folder / "data")],
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        end = time.monotonic() + 30
        while not (found := re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"s3rver did not start: {log_path.read_text()}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{found.group(1)}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def s3rver_env(s3rver_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for this process and its subprocesses that talk to s3rver."""
    return _point_at(dict(S3RVER_ENV, AWS_ENDPOINT_URL=s3rver_endpoint), monkeypatch)


def s3_client(env: dict[str, str]):
    """A boto3 client for the endpoint in `env`; the credentials are explicit, as boto3's default session keeps the first it saw."""
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"])


@pytest.fixture
def s3rver_bucket_url(s3rver_env: dict[str, str]) -> str:
    """`s3://<fresh bucket>/runs` on the s3rver server."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(s3rver_env).create_bucket(Bucket=name)
    return f"s3://{name}/runs"


@pytest.fixture
def s3_proxy(s3_bucket_url: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    """`start(**kwargs)` -> a FlakyProxy(**kwargs) in front of moto, set as this process's AWS_ENDPOINT_URL."""
    from flaky_proxy import FlakyProxy

    proxies: list[FlakyProxy] = []

    def start(**kwargs) -> FlakyProxy:
        proxy = FlakyProxy(s3_env["AWS_ENDPOINT_URL"], **kwargs).__enter__()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        clear_caches()
        return proxy

    yield start
    for proxy in proxies:
        proxy.__exit__()
    clear_caches()


@pytest.fixture(params=["local", "memory", "s3"])
def bucket_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """The storage contract runs against every backend."""
    return backend_url(request, tmp_path)


def backend_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh bucket URL of the backend `request.param` names: local, memory, or `<name>_bucket_url`'s server."""
    if request.param == "local":
        return str(tmp_path / "bucket")
    if request.param == "memory":
        from fsspec.implementations.memory import MemoryFileSystem

        MemoryFileSystem.store.clear()
        MemoryFileSystem.pseudo_dirs[:] = [""]
        return f"memory://bucket-{uuid.uuid4().hex[:8]}"
    return request.getfixturevalue(f"{request.param}_bucket_url")


@pytest.fixture(autouse=True)
def _clean_process_state() -> Iterator[None]:
    clear_caches()
    control.reset_for_tests()
    yield
    control.reset_for_tests()
