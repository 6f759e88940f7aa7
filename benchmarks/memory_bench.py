"""Host memory during periodic saves, per host-copy mode (`keep_host_copy`).

Each mode runs in a fresh child process (this file with `--worker`), so no
mode inherits another's allocator state.  The child
builds the state (`10 x nn.Linear(2048, 2048)` + Adam after one step, 504 MB,
as checkpoint_bench's `500mb`), then makes `--saves` periodic saves
(`ckpt.step(n)` + `ckpt.wait()`), one training step between saves so the
state changes, while a thread samples the resident set (`VmRSS`) every 5 ms.

Printed per mode, in MB and as a multiple of the state's size:
- `built`: RSS once the state is built (gradients freed, allocator trimmed);
- `peak in save`: the highest sample during a save, minus `built`: the host
  copy plus what serializing and publishing hold at once;
- `between saves`: RSS after a save is committed, allocator trimmed, minus
  `built`: what the mode keeps for the next capture;

(`ru_maxrss` is not used: the training step between saves allocates the
gradients, 168 MB here, which would be counted as the save's.)

The baseline in the same run is the `torch.save` of the same state into a
file (`by hand`): the bytes that path holds while it writes.

    .venv/bin/python benchmarks/memory_bench.py [--targets local,s3] [--saves 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODES = {"kept": True, "not kept": False, "default (by size)": None}
MB = 1e6


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Sampler:
    """The highest RSS seen while armed (sampled every 5 ms on a thread)."""

    def __init__(self) -> None:
        self.peak = 0
        self._armed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._armed.is_set():
                self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def arm(self) -> None:
        self.peak = rss_bytes()
        self._armed.set()

    def disarm(self) -> int:
        self._armed.clear()
        self.peak = max(self.peak, rss_bytes())
        return self.peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def build_state():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(10)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step() -> None:
        loss = model(torch.randn(8, 2048)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # gradients are not state

    train_step()
    return model, opt, train_step


def worker(mode: str, bucket: str, saves: int) -> dict:
    import torch

    import runner
    from runner.checkpoint import state

    model, opt, train_step = build_state()
    trim()
    built = rss_bytes()
    size = state.tensor_bytes({"m": model.state_dict(), "o": opt.state_dict()})
    sampler = Sampler()
    result: dict = {"mode": mode, "state_bytes": size, "built": built, "peaks": [], "between": []}
    if mode == "by hand":
        with tempfile.TemporaryDirectory() as folder:
            for n in range(saves):
                sampler.arm()
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, os.path.join(folder, "c.pt"))
                result["peaks"].append(sampler.disarm())
                train_step()
                trim()
                result["between"].append(rss_bytes())
    else:
        ckpt = runner.Checkpointer(bucket, run_id="mem", save_every_steps=1, keep_host_copy=MODES[mode],
                                   model=model, optimizer=opt)
        buffers = ckpt._host_buffers
        result["limit_bytes"] = buffers.limit_bytes if buffers is not None else None
        for n in range(1, saves + 1):
            sampler.arm()
            ckpt.step(n)
            ckpt.wait()
            result["peaks"].append(sampler.disarm())
            train_step()
            trim()
            result["between"].append(rss_bytes())
        result["kept"] = buffers is not None and buffers.refused_bytes is None
        ckpt.close()
    sampler.close()
    return result


def run_case(mode: str, bucket: str, saves: int, env: dict[str, str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        path = out.name
    try:
        subprocess.run([sys.executable, __file__, "--worker", mode, "--bucket", bucket, "--saves", str(saves),
                        "--out", path], check=True, env=env)
        return json.loads(Path(path).read_text())
    finally:
        os.unlink(path)


def row(target: str, r: dict) -> str:
    size, built = r["state_bytes"], r["built"]
    peak, between = max(r["peaks"]) - built, max(r["between"][1:] or r["between"]) - built
    x = lambda v: f"{v / MB:7.0f} {v / size:5.2f}x"  # noqa: E731
    return (f"   {target:6} {r['mode']:18} {size / MB:8.0f} {built / MB:8.0f}  {x(peak)}  {x(between)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default="local,s3")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--json", dest="json_out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--bucket", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        Path(args.out).write_text(json.dumps(worker(args.worker, args.bucket, args.saves)))
        return
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    results = []
    print(f"memory_bench: {os.cpu_count()} cpus, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB "
          f"RAM, {args.saves} periodic saves per mode, load {os.getloadavg()[0]:.2f}")
    print(f"   {'target':6} {'mode':18} {'state MB':>8} {'built MB':>8}  {'peak in save':>14}  "
          f"{'between saves':>14}")
    for target in args.targets.split(","):
        if target == "s3":
            from _moto import MotoS3

            with MotoS3() as s3:
                for mode in ("by hand", *MODES):
                    bucket = f"s3://{s3.new_bucket()}/runs"
                    results.append({"target": target, **run_case(mode, bucket, args.saves, dict(os.environ))})
                    print(row(target, results[-1]), flush=True)
                    s3.reset()
        else:
            for mode in ("by hand", *MODES):
                with tempfile.TemporaryDirectory() as folder:
                    results.append({"target": target, **run_case(mode, folder, args.saves, env)})
                print(row(target, results[-1]), flush=True)
    for r in results:
        if "kept" in r and r["mode"].startswith("default"):
            limit = r["limit_bytes"]
            print(f"   {r['target']}: the default kept the copy: {r['kept']} (limit "
                  f"{limit / MB if limit else float('nan'):.0f} MB = {limit and limit / r['state_bytes']:.1f}x the state)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
