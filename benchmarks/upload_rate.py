"""The client's upload rate alone: the same bytes into moto through runner's streaming upload and through boto3.

Why: runner's S3 commit streams its parts while `torch.save` writes them, so
what is left on its critical path is the rate at which its client moves bytes
(benchmarks/README.md, "A full run").  This isolates that rate from
serialization, hashing and manifests: one buffer of random bytes, written
1 MiB at a time into

- `runner`: `Store.open_upload` (runner/storage/upload.py: 16 MiB parts sent
  by s3fs on its one event-loop thread, at most 8 in flight), then `commit()`;
- `boto3 threads`: CreateMultipartUpload, UploadPart of 16 MiB parts from 8
  threads of one boto3 client, CompleteMultipartUpload;
- `upload_fileobj`: boto3's managed transfer (s3transfer, default
  `TransferConfig`: 8 MiB parts, 10 threads), the by-hand path of peers.py;

into moto in its own process on loopback, cases interleaved, each repeat into
a fresh bucket.  Prints MiB/s per try and the medians as ratios against
`upload_fileobj`.

    python benchmarks/upload_rate.py [--mib 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _moto_process import MotoProcess  # noqa: E402

PART = 16 * 2**20


def via_runner(bucket: str, data: bytes) -> float:
    from runner.storage.store import Store

    store = Store(f"s3://{bucket}/rate")
    view = memoryview(data)
    start = time.perf_counter()
    with store.open_upload("object") as upload:
        for pos in range(0, len(data), 2**20):
            upload.write(view[pos:pos + 2**20])
    return time.perf_counter() - start


def via_boto3_threads(bucket: str, data: bytes, threads: int = 8) -> float:
    import boto3

    client = boto3.client("s3")
    start = time.perf_counter()
    upload_id = client.create_multipart_upload(Bucket=bucket, Key="object")["UploadId"]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(client.upload_part, Bucket=bucket, Key="object", UploadId=upload_id,
                               PartNumber=number, Body=data[pos:pos + PART])
                   for number, pos in enumerate(range(0, len(data), PART), 1)]
        parts = [{"PartNumber": n, "ETag": f.result()["ETag"]} for n, f in enumerate(futures, 1)]
    client.complete_multipart_upload(Bucket=bucket, Key="object", UploadId=upload_id,
                                     MultipartUpload={"Parts": parts})
    return time.perf_counter() - start


def via_upload_fileobj(bucket: str, data: bytes) -> float:
    import boto3

    client = boto3.client("s3")
    start = time.perf_counter()
    client.upload_fileobj(io.BytesIO(data), bucket, "object")
    return time.perf_counter() - start


CASES = {"runner": via_runner, "boto3 threads": via_boto3_threads, "upload_fileobj": via_upload_fileobj}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="bytes per upload, MiB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    data = os.urandom(args.mib * 2**20)
    rates: dict[str, list[float]] = {name: [] for name in CASES}
    with MotoProcess() as moto:
        os.environ.update(moto.env())
        print(f"upload_rate: {args.mib} MiB into moto {moto.endpoint} (own process), {os.cpu_count()} cpus, "
              f"load avg {os.getloadavg()[0]:.1f}")
        for repeat in range(args.repeats):
            for name, upload in CASES.items():
                seconds = upload(moto.new_bucket("rate"), data)
                rates[name].append(args.mib / seconds)
                moto.reset()
            print(f"  try {repeat + 1}: " + "  ".join(f"{n} {r[-1]:.0f}" for n, r in rates.items()) + " MiB/s")
    base = statistics.median(rates["upload_fileobj"])
    print(f"  {'client':16s} {'median MiB/s':>12s} {'range':>11s} {'ratio':>6s}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:16s} {median:12.0f} {min(values):5.0f}-{max(values):<5.0f} {median / base:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
