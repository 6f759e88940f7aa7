"""moto's S3 server in a process of its own, on loopback, for benchmarks that time other processes.

Owns starting and stopping that process, the environment a client needs to
reach it (dummy credentials, `AWS_ENDPOINT_URL`), fresh buckets and
`POST /moto-api/reset` between cases.  benchmarks/_moto.py runs the server on
threads of the benchmark's own process; this one does not share a GIL or a
heap with anything it measures, as a real S3 endpoint would not.  moto keeps
every object in that process's memory: reset it when a case is done.

Run as a script it is the server: it prints `PORT <n>` once listening and
serves until its stdin closes (so it dies with its parent).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _moto import S3_ENV  # noqa: E402


class MotoProcess:
    """`with MotoProcess() as moto:` -> `moto.endpoint`; `moto.env()` for clients of it."""

    def __init__(self) -> None:
        self.endpoint = ""
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> "MotoProcess":
        self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("PORT "):
            self.__exit__()
            raise RuntimeError(f"moto server did not start (said {line!r})")
        self.endpoint = f"http://127.0.0.1:{int(line.split()[1])}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()  # the server's signal to stop
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """Variables that point boto3 and s3fs at `endpoint` (default: this server)."""
        return dict(S3_ENV, AWS_ENDPOINT_URL=endpoint or self.endpoint)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=S3_ENV["AWS_REGION"],
                            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self, prefix: str = "peers") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def reset(self) -> None:
        """Drop every bucket and object the server holds."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=60).close()


def _serve() -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(f"PORT {server.get_host_and_port()[1]}", flush=True)
    try:
        sys.stdin.read()  # until the parent closes it, or dies
    finally:
        server.stop()


if __name__ == "__main__":
    _serve()
