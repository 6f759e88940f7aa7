"""An in-process S3 endpoint for benchmarks: moto's threaded server on loopback.

Owns starting and stopping the server, the dummy credentials and endpoint
variables every client in the process reads (boto3, s3fs/aiobotocore), and
resetting the server between cases (`POST /moto-api/reset`, as s3fs's own test
suite does).  moto keeps every object in this process's memory, so a case that
writes hundreds of megabytes should reset it when done.
"""

from __future__ import annotations

import os
import urllib.request
import uuid

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


class MotoS3:
    """`with MotoS3() as s3:` -> endpoint in `s3.endpoint`, environment set for the process."""

    def __init__(self) -> None:
        self.endpoint = ""
        self._server = None
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> "MotoS3":
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        env = dict(S3_ENV, AWS_ENDPOINT_URL=self.endpoint)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", *env):
            self._saved_env[key] = os.environ.get(key)
        os.environ.pop("AWS_PROFILE", None)
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        os.environ.update(env)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def reset(self) -> None:
        """Drop every bucket and object the server holds."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=30).close()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def new_bucket(self, prefix: str = "bench") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name
