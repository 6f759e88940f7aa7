"""Start to first step through a failing S3: where the time goes.

A run with a few snapshots sits in moto; a loopback proxy in front of it
fails a seeded share of requests (503 SlowDown, 500, reset connections,
replies lost after the write was applied; tests/flaky_proxy.py).  Each trial
is a fresh start as a new process makes it (cleared filesystem caches): the
Checkpointer's constructor, `restore()`, one training step.  It prints, per
fault rate, the median time, the requests made before the first step, the
faults met, and the request sequence of one trial with the time each took,
next to the same start without faults (the baseline, same process).

    .venv/bin/python benchmarks/faulty_start.py [--trials 7] [--rates 0,0.13,0.3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..")]

import boto3  # noqa: E402

import tiny_training  # noqa: E402
from _moto import MotoS3  # noqa: E402
from flaky_proxy import FaultPlan, FlakyProxy  # noqa: E402
from runner import Checkpointer  # noqa: E402
from runner.storage import clear_caches  # noqa: E402

SHARES = {"503": 4, "500": 3, "reset": 3, "lost-reply": 3}  # of a fault rate, as in the tests


class TimedProxy(FlakyProxy):
    """A FlakyProxy that also notes when each request arrived."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrivals: list[float] = []

    def _choose(self, method: str, path: str):
        self.arrivals.append(time.perf_counter())
        return super()._choose(method, path)


def _plan(rate: float, seed: int) -> FaultPlan:
    total = sum(SHARES.values())
    return FaultPlan({k: rate * v / total for k, v in SHARES.items()}, seed=seed)


def _prepare(bucket: str) -> None:
    """Three committed snapshots of the tiny model, written without faults."""
    parts = tiny_training.build(seed=1)
    with Checkpointer(bucket, "start", save_every_steps=2, keep_last=3, **parts.components()) as ckpt:
        for step in range(1, 7):
            tiny_training.train_step(parts)
            ckpt.step(step)


def _trial(bucket: str) -> float:
    clear_caches()
    began = time.perf_counter()
    parts = tiny_training.build(seed=2)
    ckpt = Checkpointer(bucket, "start", **parts.components())
    ckpt.restore()
    tiny_training.train_step(parts)
    seconds = time.perf_counter() - began
    ckpt.close()
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=7)
    p.add_argument("--rates", default="0,0.13,0.3", help="fault rates to try, comma-separated")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    with MotoS3() as s3:
        name = f"start-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket=name)
        bucket = f"s3://{name}/runs"
        _prepare(bucket)
        baseline = None
        print(f"{'fault rate':>10} {'median s':>9} {'x base':>7} {'requests':>9} {'faults':>7}  faults by kind")
        for rate in (float(r) for r in args.rates.split(",")):
            times, requests, faults, example = [], [], [], None
            for trial in range(args.trials):
                with TimedProxy(s3.endpoint, faults=_plan(rate, args.seed + trial)) as proxy:
                    os.environ["AWS_ENDPOINT_URL"] = proxy.url
                    began = time.perf_counter()
                    times.append(_trial(bucket))
                    requests.append(proxy.requests)
                    faults.append(dict(proxy.counts))
                    if example is None or sum(proxy.counts.values()) > sum(example[2].values()):
                        example = (began, list(zip(proxy.arrivals, proxy.log)), dict(proxy.counts))
            os.environ["AWS_ENDPOINT_URL"] = s3.endpoint
            median = statistics.median(times)
            baseline = baseline or median
            kinds: dict[str, int] = {}
            for f in faults:
                for k, v in f.items():
                    kinds[k] = kinds.get(k, 0) + v
            print(f"{rate:>10.2f} {median:>9.2f} {median / baseline:>7.2f} {statistics.median(requests):>9.0f} "
                  f"{sum(sum(f.values()) for f in faults) / len(faults):>7.1f}  {kinds}")
            if rate == max(float(r) for r in args.rates.split(",")) and example:
                began, sequence, counts = example
                print(f"  request sequence of the trial with the most faults ({counts}):")
                for (at, what), nxt in zip(sequence, [a for a, _ in sequence[1:]] + [None]):
                    gap = f"{(nxt - at):.2f}s until next" if nxt else ""
                    print(f"    +{at - began:6.2f}s  {what[:100]}  {gap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
