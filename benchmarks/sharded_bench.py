"""Sharded snapshots of a torchrun job against one plain process, same state, same endpoint.

Owns measuring `runner.Checkpointer` save and restore in a 2-rank torchrun
job (CPU, gloo), where it saves sharded through torch.distributed.checkpoint
(runner/checkpoint/sharded/), next to a baseline run by this same script on
the same state and the same endpoint: one plain process (no process group)
saving the same model and optimizer as one single-layout snapshot.

This file is both the driver and the worker.  The driver starts every job as
a child (`torch.distributed.run --standalone --nproc-per-node N` for the
sharded layouts, plain `python` for the baseline), each running this file
with `--worker save` or `--worker restore`.  Every rank times its own calls
after building its state (process start, imports and the model are not
timed) and writes its figures to a JSON file per rank; the driver takes the
slowest rank of each job, then the median over repeats.

Why a fresh job per repeat and a fresh job for every restore: a restore is
what a new job does after a preemption, so it is measured in processes that
have never seen the state; and the layouts run alternately within each
repeat (who goes first flips every repeat), so drift hits both.

    .venv/bin/python benchmarks/sharded_bench.py [--targets local,s3]
        [--layouts single,w2] [--mode ddp|fsdp] [--state-mb 200] [--repeats 3] [--json OUT]

See benchmarks/README.md for what every column means.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

MB = 1e6  # sizes and throughputs are decimal megabytes
JOB_TIMEOUT_S = 900


# --------------------------------------------------------------------------
# Worker side: runs inside every rank (or the one plain process)


def _free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Phases:
    """Seconds spent inside chosen functions, summed per label (threads add up: busy time, not wall)."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self._seconds[label] += time.perf_counter() - started

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        with self._lock:
            out, self._seconds = dict(self._seconds), defaultdict(float)
        return out


def _instrument() -> Phases:
    """Time the pieces of a save and a restore, both layouts, without changing what they do."""
    from runner.checkpoint import checkpointer, reader, retention, sharded, state
    from runner.storage import Store

    phases = Phases()
    # Both layouts.
    phases.wrap(Store, "write_file", "publish")  # upload, or fsync + rename (+ copy) on a local store
    phases.wrap(Store, "create_bytes", "manifest")
    phases.wrap(retention, "plan", "retention")
    phases.wrap(retention, "apply", "retention")
    phases.wrap(reader.RunReader, "read_file", "read+verify")  # GET (or file read) + SHA-256
    # Single layout.
    phases.wrap(state, "serialize_to", "serialize+hash")  # into the spool file, hashed as written
    phases.wrap(state, "deserialize", "deserialize")
    phases.wrap(checkpointer.Checkpointer, "_apply", "load_state_dict")
    # Sharded layout.
    phases.wrap(sharded, "_state_dicts", "get_state_dict")
    phases.wrap(sharded, "spool", "spool")  # DCP spool write + RNG file (the training stall)
    phases.wrap(sharded, "_publish", "hash+publish")
    phases.wrap(sharded, "_commit", "plan+manifest")  # rank 0
    phases.wrap(sharded, "load", "sharded_load")
    phases.wrap(sharded, "_load_state_dicts", "set_state_dict")
    return phases


def _build(mode: str, layers: int, width: int) -> tuple[Any, Any]:
    """`layers` x Linear(width, width) + Adam; DDP- or FSDP2-wrapped in a torchrun job."""
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    if dist.is_initialized() and mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model)
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def _train_one_step(model: Any, optimizer: Any, width: int, rank: int) -> None:
    import torch

    g = torch.Generator().manual_seed(100 + rank)
    model(torch.randn(4, width, generator=g)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # gradients are not state; free them


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor -> this rank's shard


def _fingerprint(model: Any, optimizer: Any) -> tuple[float, int]:
    """(sum, bytes) of this rank's parameters and optimizer tensors: equal after a faithful restore."""
    import torch

    tensors = [_local(p.detach()) for p in model.parameters()]
    tensors += [_local(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    total = sum(float(t.double().sum()) for t in tensors)
    return total, sum(t.numel() * t.element_size() for t in tensors)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import runner

    logging.basicConfig(level=logging.WARNING)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    phases = _instrument()
    model, optimizer = _build(args.mode, args.layers, args.width)
    out: dict[str, Any] = {"rank": rank, "world_size": world, "torch_threads": torch.get_num_threads()}

    def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
        _free_memory()
        _barrier()  # every rank starts the clock together
        phases.take()
        started = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - started

    if args.worker == "save":
        _train_one_step(model, optimizer, args.width, rank)  # Adam's moments exist after one step
        ckpt = runner.Checkpointer(args.bucket, run_id=args.run_id, save_every_steps=1, model=model,
                                   optimizer=optimizer)
        step = 0
        for _ in range(args.warmup):  # untimed: first-save costs (allocations, lazy imports)
            step += 1
            ckpt.step(step)
            ckpt.wait()
        # The periodic path: step(n) with a save due; the stall is what training waits for.
        step += 1
        stall_start = time.perf_counter()
        _, stall = timed(lambda: ckpt.step(step))
        ckpt.wait()
        out["commit_s"] = time.perf_counter() - stall_start
        out["stall_s"] = stall
        out["periodic_phases"] = phases.take()
        out["periodic_write_s"] = ckpt.last_commit.write_seconds
        out["periodic_capture_s"] = ckpt.last_commit.capture_seconds
        # save(n): synchronous, returns once the manifest is committed (wait() is then a no-op).
        step += 1
        _, out["save_s"] = timed(lambda: (ckpt.save(step), ckpt.wait()))
        out["save_phases"] = phases.take()
        manifest = ckpt.last_commit.manifest
        assert manifest.step == step, f"committed step {manifest.step}, expected {step}"
        out.update(step=step, snapshot=manifest.snapshot_id, layout=manifest.layout,
                   total_bytes=manifest.total_bytes, files={f.path: f.size for f in manifest.files},
                   save_capture_s=ckpt.last_commit.capture_seconds, save_write_s=ckpt.last_commit.write_seconds)
        ckpt.close()
    else:
        holder: dict[str, Any] = {}

        def restore() -> int:
            holder["ckpt"] = runner.Checkpointer(args.bucket, run_id=args.run_id, model=model, optimizer=optimizer)
            return holder["ckpt"].restore()

        out["step"], out["restore_s"] = timed(restore)
        out["restore_phases"] = phases.take()
        manifest = holder["ckpt"].last_snapshot
        out.update(snapshot=manifest.snapshot_id if manifest else None,
                   total_bytes=manifest.total_bytes if manifest else 0)
        holder["ckpt"].close()
    out["fingerprint"], out["rank_state_bytes"] = _fingerprint(model, optimizer)
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps(out))
    _barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------
# Driver side


def layers_for(state_mb: float, width: int) -> int:
    """Linear layers for about `state_mb` of state: fp32 parameters + Adam's two moments (3x)."""
    per_layer = 3 * 4 * (width * width + width)
    return max(1, round(state_mb * MB / per_layer))


def layout_name(layout: str) -> str:
    return "single (baseline)" if layout == "single" else f"sharded W={layout[1:]}"


def job_env() -> dict[str, str]:
    """The workers' environment: this checkout, no RUNNER_* from outside, one intra-op thread per process."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RUNNER_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                        "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_job(layout: str, kind: str, bucket: str, run_id: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One job (all its ranks); returns every rank's figures.  Raises SystemExit when the job fails."""
    script = [str(Path(__file__).resolve()), "--worker", kind, "--bucket", bucket, "--run-id", run_id,
              "--mode", args.mode, "--layers", str(args.layers), "--width", str(args.width),
              "--warmup", str(args.warmup)]
    if layout == "single":
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", layout[1:]]
    with tempfile.TemporaryDirectory(prefix="runner-shbench-out-", dir=args.tmp) as out:
        done = subprocess.run([*launcher, *script, "--out", out], env=job_env(), capture_output=True,
                              text=True, timeout=JOB_TIMEOUT_S)
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank-*.json"))]
    want = 1 if layout == "single" else int(layout[1:])
    if done.returncode != 0 or len(ranks) != want:
        log_file = Path(tempfile.mkstemp(prefix=f"runner-shbench-{kind}-{layout}-", suffix=".log", dir=args.tmp)[1])
        log_file.write_text(done.stdout + done.stderr)
        tail = "\n".join(done.stderr.splitlines()[-150:])
        raise SystemExit(f"{kind} job {layout_name(layout)} failed (exit {done.returncode}, "
                         f"{len(ranks)}/{want} ranks reported); its output is in {log_file}:\n{tail}")
    return sorted(ranks, key=lambda r: r["rank"])


class Target:
    """Where one job's snapshots go; `fresh()` gives a new bucket URL, `clear()` frees it."""

    name = ""

    def fresh(self) -> str: ...
    def clear(self) -> None: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


class LocalTarget(Target):
    name = "local"

    def __init__(self, root: str | None):
        self.root = Path(tempfile.mkdtemp(prefix="runner-shbench-", dir=root))
        self.n = 0

    def fresh(self) -> str:
        self.n += 1
        return str(self.root / f"bucket-{self.n}")

    def clear(self) -> None:
        for child in self.root.iterdir():
            shutil.rmtree(child, ignore_errors=True)

    def describe(self) -> str:
        return f"local folder {self.root}"

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class S3Target(Target):
    name = "s3"

    def __init__(self, moto: Any):
        self.moto = moto
        moto.reset()

    def fresh(self) -> str:
        return f"s3://{self.moto.new_bucket()}/runs"

    def clear(self) -> None:
        self.moto.reset()  # moto keeps every object in memory

    def describe(self) -> str:
        return f"S3 on moto {self.moto.endpoint} (this driver process, loopback; the workers are other processes)"

    def close(self) -> None:
        self.moto.reset()


def _slowest(ranks: list[dict[str, Any]], key: str) -> float:
    return max(r[key] for r in ranks)


def run_target(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {layout: [] for layout in args.layouts}
    for rep in range(args.repeats):
        order = args.layouts if rep % 2 == 0 else list(reversed(args.layouts))
        for layout in order:
            bucket, run_id = target.fresh(), f"{layout}-r{rep}"
            saved = run_job(layout, "save", bucket, run_id, args)
            restored = run_job(layout, "restore", bucket, run_id, args)
            target.clear()
            for s, r in zip(saved, restored):
                if r["step"] != s["step"] or r["snapshot"] != s["snapshot"]:
                    raise SystemExit(f"{layout_name(layout)}: rank {r['rank']} restored {r['snapshot']} "
                                     f"(step {r['step']}), saved {s['snapshot']} (step {s['step']})")
                if r["fingerprint"] != s["fingerprint"]:
                    raise SystemExit(f"{layout_name(layout)}: rank {r['rank']} restored a different state "
                                     f"(sum {r['fingerprint']!r} != {s['fingerprint']!r})")
            samples[layout].append({
                "stall_s": _slowest(saved, "stall_s"), "commit_s": _slowest(saved, "commit_s"),
                "save_s": _slowest(saved, "save_s"), "restore_s": _slowest(restored, "restore_s"),
                "total_bytes": saved[0]["total_bytes"], "state_bytes": sum(r["rank_state_bytes"] for r in saved)
                if args.mode == "fsdp" and layout != "single" else saved[0]["rank_state_bytes"],
                "save_ranks": saved, "restore_ranks": restored})
            print(f"   {target.name} repeat {rep + 1}/{args.repeats} {layout_name(layout)}: "
                  f"save {samples[layout][-1]['save_s']:.2f} s, restore {samples[layout][-1]['restore_s']:.2f} s",
                  flush=True)
    medians = {}
    for layout, reps in samples.items():
        medians[layout] = {k: statistics.median(r[k] for r in reps)
                           for k in ("stall_s", "commit_s", "save_s", "restore_s", "total_bytes", "state_bytes")}
        medians[layout]["phases"] = _median_phases(reps)
    return {"target": target.name, "target_detail": target.describe(), "median": medians, "samples": samples}


def _median_phases(reps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rank: the median over repeats of every phase of the timed save() and of the restore."""
    out = []
    for rank in range(len(reps[0]["save_ranks"])):
        row: dict[str, Any] = {"rank": rank}
        for side, key in (("save", "save_phases"), ("restore", "restore_phases")):
            ranks_key = f"{side}_ranks"
            labels = {k for r in reps for k in r[ranks_key][rank][key]}
            row[side] = {k: statistics.median(r[ranks_key][rank][key].get(k, 0.0) for r in reps) for k in labels}
            row[side]["total"] = statistics.median(r[ranks_key][rank][f"{side}_s"] for r in reps)
        row["shard_bytes"] = next((size for path, size in reps[0]["save_ranks"][0]["files"].items()
                                   if path == f"__{rank}_0.distcp"), None)
        out.append(row)
    return out


def format_target(result: dict[str, Any], args: argparse.Namespace, base: str) -> list[list[str]]:
    rows = []
    m0 = result["median"].get(base)
    for layout in args.layouts:
        m = result["median"][layout]

        def ratio(key: str) -> str:
            return f"{m[key] / m0[key]:.2f}" if m0 else ""

        rows.append([result["target"], layout_name(layout), f"{m['state_bytes'] / MB:.0f}",
                     f"{m['total_bytes'] / MB:.0f}", f"{m['stall_s']:.2f}", f"{m['save_s']:.2f}", ratio("save_s"),
                     f"{m['total_bytes'] / m['save_s'] / MB:.0f}", f"{m['restore_s']:.2f}", ratio("restore_s"),
                     f"{m['total_bytes'] / m['restore_s'] / MB:.0f}"])
    return rows


def format_phases(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Where each rank's time goes (medians), one line per layout and rank for save and for restore."""
    lines = []
    for layout in args.layouts:
        for row in result["median"][layout]["phases"]:
            who = f"{result['target']} {layout_name(layout)}" + ("" if layout == "single" else f" rank {row['rank']}")
            s, r = row["save"], row["restore"]
            if layout == "single":
                save = [("serialize+hash", s.get("serialize+hash", 0.0)), ("publish", s.get("publish", 0.0)),
                        ("manifest", s.get("manifest", 0.0)), ("retention", s.get("retention", 0.0))]
                rest = [("read+verify", r.get("read+verify", 0.0)), ("deserialize", r.get("deserialize", 0.0)),
                        ("load_state_dict", r.get("load_state_dict", 0.0))]
            else:
                # DCP's own spool write (planning collectives and the RNG file included) is what spool()
                # spends outside get_state_dict; "publish" is inside "hash+publish".
                dcp_write = s.get("spool", 0.0) - s.get("get_state_dict", 0.0)
                hashing = s.get("hash+publish", 0.0) - s.get("publish", 0.0)
                save = [("get_state_dict", s.get("get_state_dict", 0.0)), ("dcp spool write", dcp_write),
                        ("sha256", hashing), ("publish", s.get("publish", 0.0)),
                        ("plan+manifest", s.get("plan+manifest", 0.0)), ("retention", s.get("retention", 0.0))]
                dcp_read = (r.get("sharded_load", 0.0) - r.get("read+verify", 0.0) - r.get("get_state_dict", 0.0)
                            - r.get("set_state_dict", 0.0))
                rest = [("read+verify", r.get("read+verify", 0.0)), ("get_state_dict", r.get("get_state_dict", 0.0)),
                        ("dcp load", dcp_read), ("set_state_dict", r.get("set_state_dict", 0.0))]
            other_save = s["total"] - sum(v for _, v in save)
            other_rest = r["total"] - sum(v for _, v in rest)
            shard = f", writes {row['shard_bytes'] / MB:.0f} MB" if row.get("shard_bytes") else ""
            lines.append(f"   {who}{shard}")
            lines.append(f"     save()  {s['total']:.2f} s = {_sum_line(save, other_save)}")
            lines.append(f"     restore {r['total']:.2f} s = {_sum_line(rest, other_rest)}")
    return lines


def _sum_line(parts: list[tuple[str, float]], other: float) -> str:
    text = " + ".join(f"{k} {v:.2f}" for k, v in parts if v > 0.0005)
    # Pieces that run on threads at once (the single layout serializes while it publishes) overlap.
    return text + (f" + other {other:.2f}" if other >= 0 else f" (pieces overlap by {-other:.2f})")


def table(rows: list[list[str]]) -> str:
    head = ["target", "layout", "state MB", "snapshot MB", "stall s", "save s", "ratio", "save MB/s",
            "restore s", "ratio", "restore MB/s"]
    all_rows = [head, *rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(head))]
    return "\n".join("   " + "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in
                                      enumerate(zip(row, widths))).rstrip() for row in all_rows)


def driver(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    from _moto import MotoS3

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    os.environ.pop("RUNNER_CONTROL_DIR", None)
    per_layer = 3 * 4 * (args.width * args.width + args.width)
    print(f"sharded_bench: python {platform.python_version()}, torch {version('torch')}, {os.cpu_count()} cpus, "
          f"gloo, OMP_NUM_THREADS=1 per worker; state {args.layers} x Linear({args.width},{args.width}) + Adam "
          f"after 1 step = {args.layers * per_layer / MB:.0f} MB, {args.mode}; {args.repeats} repeats "
          f"(median, slowest rank), {args.warmup} untimed save(s) per job first", flush=True)
    started = time.perf_counter()
    results, rows, phase_lines = [], [], []
    with contextlib.ExitStack() as stack:
        moto = stack.enter_context(MotoS3()) if "s3" in args.targets else None
        for tname in args.targets:
            target: Target = LocalTarget(args.tmp) if tname == "local" else S3Target(moto)
            load_before = os.getloadavg()[0]
            try:
                result = run_target(target, args)
            finally:
                target.close()
            result.update(load_before=load_before, load_after=os.getloadavg()[0])
            results.append(result)
            rows += format_target(result, args, "single")
            phase_lines += format_phases(result, args)
            print(f"   {tname}: {result['target_detail']}; load avg {load_before:.1f} -> "
                  f"{result['load_after']:.1f}", flush=True)
    print()
    print(table(rows))
    print()
    print("   where the time goes (medians; busy seconds of each rank, threads add up):")
    print("\n".join(phase_lines))
    print(f"\n   total {time.perf_counter() - started:.0f} s", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"results": results, "argv": sys.argv[1:],
                                                   "layers": args.layers, "width": args.width,
                                                   "mode": args.mode}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="local,s3", help="comma list of: local, s3")
    p.add_argument("--layouts", default="single,w2",
                   help="comma list of: single (the baseline: one plain process), wN (a torchrun job of N ranks)")
    p.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp",
                   help="how the torchrun job holds the model: DDP (every rank a replica) or FSDP2 (each rank 1/N)")
    p.add_argument("--state-mb", type=float, default=200.0, help="parameters + Adam moments, decimal MB")
    p.add_argument("--width", type=int, default=2048, help="Linear(width, width) layers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed saves in each save job before the timed ones")
    p.add_argument("--tmp", default=None, help="folder for the local target and the workers' reports")
    p.add_argument("--json", dest="json_out", default=None, help="also write every number here")
    # Worker mode (the driver starts these).
    p.add_argument("--worker", choices=("save", "restore"), help=argparse.SUPPRESS)
    p.add_argument("--bucket", help=argparse.SUPPRESS)
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    bad = [t for t in args.targets if t not in ("local", "s3")]
    bad += [x for x in args.layouts if x != "single" and not (x[:1] == "w" and x[1:].isdigit() and int(x[1:]) >= 1)]
    if bad:
        p.error(f"unknown target/layout: {', '.join(bad)}")
    if args.repeats < 1 or args.warmup < 0 or args.state_mb <= 0 or args.width < 1:
        p.error("--repeats >= 1, --warmup >= 0, --state-mb > 0, --width >= 1")
    args.layers = layers_for(args.state_mb, args.width)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
