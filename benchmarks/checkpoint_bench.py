"""Checkpoint speed against a plain baseline, same state, same endpoint, one process.

Owns the DESIGN.md section 5 measurements that a checkpoint save and restore
can be held to: the training stall of a periodic save, the time to a durable
commit, upload throughput and restore time.  Each is printed next to a
baseline measured in the same process on the same state and the same endpoint:

- baseline save: `torch.save(bundle, file)` (+ fsync) for a local folder, or
  `torch.save` to a staging file + `boto3.client('s3').upload_file` (default
  TransferConfig: 8 MiB parts, 10 threads) for S3.  It is synchronous, so its
  stall is the whole thing.
- host copy: `runner.checkpoint.state.capture` alone, the "time to copy the
  state to host memory" of the stall target.
- raw put / raw get: the same bytes through boto3 (`upload_fileobj`,
  `download_fileobj`, default TransferConfig) or plain file I/O, against
  runner's `Store.write_bytes` / `Store.read_bytes`.

Why medians over interleaved repeats: runner and baseline run alternately in
each repeat, so drift (page cache, moto's memory, the allocator) hits both.

    .venv/bin/python benchmarks/checkpoint_bench.py [--states example,500mb]
        [--targets local,s3] [--repeats 3] [--json OUT]

See benchmarks/README.md for what every column means.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _moto import MotoS3  # noqa: E402

from runner import Checkpointer  # noqa: E402
from runner.checkpoint import state as ckstate  # noqa: E402
from runner.storage import Store, clear_caches  # noqa: E402

MB = 1e6  # throughput and sizes are decimal megabytes

# DESIGN.md section 5 targets.
STALL_FACTOR, STALL_SLACK_S = 1.2, 0.05
UPLOAD_FACTOR = 0.8
RESTORE_FACTOR, RESTORE_SLACK_S = 1.25, 1.0
OVERHEAD_FRACTION = 0.035

# Runner keeps this many snapshots (its default); the baseline keeps as many files, so the
# page cache (local) and moto's memory (S3) carry the same load for both.
KEEP_LAST = 3


# --------------------------------------------------------------------------
# States


@dataclass
class BenchState:
    name: str
    source: str  # what was built, in words
    components: dict[str, Any]

    def bundle(self) -> dict[str, Any]:
        """What a user without runner would torch.save: every component's state_dict."""
        return {name: obj.state_dict() for name, obj in self.components.items()}


def _describe(components: dict[str, Any]) -> str:
    parts = [f"{n} {ckstate.tensor_bytes(o.state_dict()) / MB:.1f} MB" for n, o in components.items()]
    return ", ".join(parts)


def example_state(source: str) -> BenchState:
    """The voice example's whole training state after one step (or a stand-in of its size)."""
    if source in ("auto", "voice"):
        try:
            from runner.examples import voice
        except ImportError as exc:
            if source == "voice":
                raise SystemExit(f"--example voice: cannot import runner.examples.voice ({exc})") from None
        else:
            torch.manual_seed(0)
            w = voice.build_workload(voice.VoiceConfig())
            voice.train_step(w)  # Adam moments exist after one step
            components = {"gpt": w.gpt, "sovits": w.sovits, "optimizer": w.optimizer,
                          "scheduler": w.scheduler, "data": w.batches}
            return BenchState("example", f"runner.examples.voice after 1 step ({_describe(components)})", components)
    # Stand-in: two small modules and one Adam, about the voice example's size.
    torch.manual_seed(0)
    gpt = nn.Sequential(nn.Embedding(33, 96), nn.TransformerEncoderLayer(96, 4, 384, batch_first=True), nn.Linear(96, 33))
    sovits = nn.Sequential(nn.Conv1d(96, 96, 5, padding=2), nn.ReLU(), nn.Conv1d(96, 96, 5, padding=2))
    opt = torch.optim.Adam([*gpt.parameters(), *sovits.parameters()], lr=1e-3)
    loss = gpt(torch.randint(0, 33, (2, 16))).mean() + sovits(torch.randn(2, 96, 16)).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    components = {"gpt": gpt, "sovits": sovits, "optimizer": opt}
    return BenchState("example", f"stand-in, two small modules + Adam ({_describe(components)})", components)


def big_state() -> BenchState:
    """~500 MB: a 10 x Linear(2048, 2048) model (~168 MB fp32) + Adam's two moments after one step."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(10)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(4, 2048)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)  # gradients are not part of the state; free them
    components = {"model": model, "optimizer": opt}
    return BenchState("500mb", f"10 x Linear(2048,2048) + Adam after 1 step ({_describe(components)})", components)


# --------------------------------------------------------------------------
# Targets


class Target:
    """Where snapshots and baseline files go, and the raw (non-runner) I/O on it."""

    name = ""

    def url(self) -> str: ...
    def baseline_save(self, bundle: dict[str, Any], tag: str) -> tuple[int, float, float]: ...
    def raw_put(self, data: bytes, tag: str) -> None: ...
    def raw_get(self, tag: str) -> bytes: ...
    def raw_get_single(self, tag: str) -> bytes: ...
    def delete(self, tag: str) -> None: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


class LocalTarget(Target):
    name = "local"

    def __init__(self, root: str):
        self.root = Path(tempfile.mkdtemp(prefix="runner-bench-", dir=root))
        (self.root / "baseline").mkdir()

    def url(self) -> str:
        return str(self.root / "bucket")

    def describe(self) -> str:
        return f"local folder {self.root}"

    def _path(self, tag: str) -> Path:
        return self.root / "baseline" / f"{tag}.pt"

    def baseline_save(self, bundle, tag):
        path = self._path(tag)
        started = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(bundle, f)
            f.flush()
            os.fsync(f.fileno())  # runner's local writes fsync; same durability
        saved = time.perf_counter()
        return path.stat().st_size, saved - started, 0.0

    def raw_put(self, data, tag):
        with open(self._path(tag), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def raw_get(self, tag):
        return self._path(tag).read_bytes()

    raw_get_single = raw_get

    def delete(self, tag):
        self._path(tag).unlink(missing_ok=True)

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)


class S3Target(Target):
    name = "s3"

    def __init__(self, moto: MotoS3, root: str):
        moto.reset()
        clear_caches()
        self.moto = moto
        self.bucket = moto.new_bucket()
        self.client = moto.client()
        self.staging = Path(tempfile.mkdtemp(prefix="runner-bench-staging-", dir=root))

    def url(self) -> str:
        return f"s3://{self.bucket}/runs"

    def describe(self) -> str:
        return f"S3 on moto {self.moto.endpoint} (in-process, loopback)"

    def baseline_save(self, bundle, tag):
        path = self.staging / f"{tag}.pt"
        started = time.perf_counter()
        torch.save(bundle, path)
        saved = time.perf_counter()
        self.client.upload_file(str(path), self.bucket, f"baseline/{tag}.pt")
        uploaded = time.perf_counter()
        size = path.stat().st_size
        path.unlink()
        return size, saved - started, uploaded - saved

    def raw_put(self, data, tag):
        self.client.upload_fileobj(io.BytesIO(data), self.bucket, f"baseline/{tag}.pt")

    def raw_get(self, tag):
        buffer = io.BytesIO()
        self.client.download_fileobj(self.bucket, f"baseline/{tag}.pt", buffer)
        return buffer.getvalue()

    def raw_get_single(self, tag):
        return self.client.get_object(Bucket=self.bucket, Key=f"baseline/{tag}.pt")["Body"].read()

    def delete(self, tag):
        self.client.delete_object(Bucket=self.bucket, Key=f"baseline/{tag}.pt")

    def close(self):
        shutil.rmtree(self.staging, ignore_errors=True)
        self.moto.reset()
        clear_caches()


# --------------------------------------------------------------------------
# One case: one state on one target


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def _free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _main_thread_delay(busy: Callable[[], bool], tick_s: float = 0.001) -> float:
    """Seconds this thread was held up (GIL, CPU) while the writer committed in the background.

    Ticks every `tick_s` like a training loop would run Python; a tick that
    comes late by more than 1 ms counts its lateness.
    """
    delayed, last = 0.0, time.perf_counter()
    while busy():
        time.sleep(tick_s)
        now = time.perf_counter()
        late = now - last - tick_s
        if late > 0.001:
            delayed += late
        last = now
    return delayed


def run_case(bstate: BenchState, target: Target, repeats: int, warmup: int) -> dict[str, Any]:
    url = target.url()
    comps = bstate.components
    ckpt = Checkpointer(url, run_id="bench", save_every_steps=1, keep_last=KEEP_LAST, **comps)
    put_store = Store(url)
    kept: list[str] = []
    step = 0

    def runner_periodic(s: dict[str, float]) -> None:
        """The host copy alone, then a periodic async save; both from a trimmed allocator."""
        nonlocal step
        ckpt.wait()
        _free_memory()
        captured, s["copy"] = _timed(lambda: ckstate.capture(comps))
        del captured
        _free_memory()
        step += 1
        t0 = time.perf_counter()
        ckpt.step(step)  # the stall: host copy + hand-off to the writer thread
        t1 = time.perf_counter()
        s["delayed"] = _main_thread_delay(ckpt._writer.busy)  # private: no public "commit in flight?"
        ckpt.wait()
        t2 = time.perf_counter()
        assert ckpt.last_commit is not None and ckpt.last_commit.manifest.step == step, "step() did not save"
        s["stall_async"] = t1 - t0
        s["commit"] = t2 - t0
        s["write_seconds"] = ckpt.last_commit.write_seconds
        s["capture_in_step"] = ckpt.last_commit.capture_seconds
        s["runner_bytes"] = float(sum(f.size for f in ckpt.last_commit.manifest.files))
        _free_memory()

    def runner_sync(s: dict[str, float]) -> None:
        nonlocal step
        step += 1
        _, s["stall_sync"] = _timed(lambda: ckpt.save(step))
        _free_memory()

    def baseline(s: dict[str, float], tag: str) -> None:
        """torch.save (+ upload): synchronous, so all of it is stall."""
        size, save_s, upload_s = target.baseline_save(bstate.bundle(), tag)
        s.update(baseline=save_s + upload_s, baseline_save=save_s, baseline_upload=upload_s,
                 baseline_bytes=float(size))
        kept.append(tag)
        while len(kept) > KEEP_LAST:  # keep as many baseline files as runner keeps snapshots
            target.delete(kept.pop(0))
        _free_memory()

    samples: list[dict[str, float]] = []
    for rep in range(-warmup, repeats):
        s: dict[str, float] = {}
        flip = rep % 2 == 1  # alternate who goes first: the page cache and moto remember the last write
        # 1-3. runner periodic (async) save, baseline save, runner synchronous save.
        order = [lambda: baseline(s, f"save-{rep}"), lambda: runner_periodic(s), lambda: runner_sync(s)]
        for fn in order if flip else [order[1], order[0], order[2]]:
            fn()

        # 4. what the writer does with a host copy, piece by piece (for the breakdown).
        captured = ckstate.capture(comps)
        blobs, s["serialize"] = _timed(lambda: [ckstate.serialize(v) for v in captured.values()])
        del captured
        _, s["sha256"] = _timed(lambda: [hashlib.sha256(b).hexdigest() for b in blobs])
        data = b"".join(blobs)
        del blobs
        s["put_bytes"] = float(len(data))
        _free_memory()

        # 5. the storage path alone, same bytes: runner Store vs raw boto3 / file I/O.
        key, tag = f"bench-put/{rep}.bin", f"put-{rep}"
        puts = [("raw_put", lambda: target.raw_put(data, tag)), ("runner_put", lambda: put_store.write_bytes(key, data))]
        gets = [("raw_get", lambda: target.raw_get(tag)), ("raw_get_single", lambda: target.raw_get_single(tag)),
                ("runner_get", lambda: put_store.read_bytes(key))]
        for name, fn in reversed(puts) if flip else puts:
            _, s[name] = _timed(fn)
            _free_memory()
        del data
        for name, fn in reversed(gets) if flip else gets:
            got, s[name] = _timed(fn)
            del got
            _free_memory()
        put_store.delete([key])
        target.delete(tag)
        _free_memory()

        # 6. restore, start to loaded: a fresh Checkpointer (fresh S3 client) finding and loading the newest.
        clear_caches()
        t0 = time.perf_counter()
        fresh = Checkpointer(url, run_id="bench", **comps)
        restored = fresh.restore()
        s["restore"] = time.perf_counter() - t0
        fresh.close()
        assert restored == step, f"restored step {restored}, expected {step}"
        del fresh
        _free_memory()
        if rep >= 0:
            samples.append(s)
    ckpt.close()
    del ckpt, put_store
    _free_memory()

    med = {k: statistics.median(x[k] for x in samples) for k in samples[0]}
    raw = {k: [x[k] for x in samples] for k in samples[0]}
    return {"state": bstate.name, "state_source": bstate.source, "target": target.name,
            "target_detail": target.describe(), "repeats": repeats, "median": med, "samples": raw,
            "checks": checks(med)}


def raw_get_seconds(m: dict[str, float], key: str = "raw_get") -> float:
    """Seconds a raw GET of the runner snapshot's bytes takes at the raw bandwidth measured.

    `raw_get` is boto3's parallel ranged download (DESIGN.md's "raw parallel GET");
    `raw_get_single` one plain GET stream.
    """
    return m[key] * m["runner_bytes"] / m["put_bytes"]


def checks(m: dict[str, float]) -> dict[str, Any]:
    stall_limit = STALL_FACTOR * m["copy"] + STALL_SLACK_S
    restore_limit = RESTORE_FACTOR * raw_get_seconds(m) + RESTORE_SLACK_S
    raw_put_bw = m["put_bytes"] / m["raw_put"]
    runner_put_bw = m["put_bytes"] / m["runner_put"]
    return {
        "stall": {"limit_s": stall_limit, "pass": m["stall_async"] <= stall_limit},
        "upload": {"limit_MBps": UPLOAD_FACTOR * raw_put_bw / MB, "pass": runner_put_bw >= UPLOAD_FACTOR * raw_put_bw},
        "restore": {"limit_s": restore_limit, "pass": m["restore"] <= restore_limit},
    }


# --------------------------------------------------------------------------
# Report


def _ok(flag: bool) -> str:
    return "PASS" if flag else "FAIL"


def format_case(r: dict[str, Any]) -> str:
    m, c = r["median"], r["checks"]

    def mbps(nbytes: float, seconds: float) -> str:
        return f"{nbytes / seconds / MB:.0f}"

    get_s = raw_get_seconds(m)
    rows = [
        ("metric", "runner", "baseline", "ratio", "target", "check"),
        ("stall, periodic save (s)", f"{m['stall_async']:.3f}", f"{m['baseline']:.3f}",
         f"{m['stall_async'] / m['baseline']:.3f}", f"<= 1.2*copy+0.05 = {c['stall']['limit_s']:.3f}",
         _ok(c["stall"]["pass"])),
        ("  host copy alone (s)", f"{m['copy']:.3f}", "", "", "", ""),
        ("  copy inside step() (s)", f"{m['capture_in_step']:.3f}", "", "", "", ""),
        ("  loop delayed by writer (s)", f"{m['delayed']:.3f}", "", "", "", ""),
        ("stall, sync save() (s)", f"{m['stall_sync']:.3f}", f"{m['baseline']:.3f}",
         f"{m['stall_sync'] / m['baseline']:.2f}", "", ""),
        ("commit, save->durable (s)", f"{m['commit']:.3f}", f"{m['baseline']:.3f}",
         f"{m['commit'] / m['baseline']:.2f}", "", ""),
        ("  serialize|sha256|writer (s)", f"{m['serialize']:.2f}|{m['sha256']:.2f}|{m['write_seconds']:.2f}",
         f"save {m['baseline_save']:.2f}|up {m['baseline_upload']:.2f}", "", "", ""),
        ("commit throughput (MB/s)", mbps(m["runner_bytes"], m["commit"]), mbps(m["baseline_bytes"], m["baseline"]),
         f"{(m['runner_bytes'] / m['commit']) / (m['baseline_bytes'] / m['baseline']):.2f}", "", ""),
        ("put, same bytes (MB/s)", mbps(m["put_bytes"], m["runner_put"]), mbps(m["put_bytes"], m["raw_put"]),
         f"{m['raw_put'] / m['runner_put']:.2f}", f">= 0.8*raw = {c['upload']['limit_MBps']:.0f}",
         _ok(c["upload"]["pass"])),
        ("get, same bytes (MB/s)", mbps(m["put_bytes"], m["runner_get"]), mbps(m["put_bytes"], m["raw_get"]),
         f"{m['raw_get'] / m['runner_get']:.2f}", "", ""),
    ]
    if r["target"] == "s3":
        rows.append(("  raw single-stream GET (MB/s)", "", mbps(m["put_bytes"], m["raw_get_single"]), "", "", ""))
    rows.append(("restore, start->loaded (s)", f"{m['restore']:.3f}", f"GET {get_s:.3f}", f"{m['restore'] / get_s:.2f}",
                 f"<= 1.25*GET+1 = {c['restore']['limit_s']:.3f}", _ok(c["restore"]["pass"])))
    if r["target"] == "s3":
        single_s = raw_get_seconds(m, "raw_get_single")
        rows.append(("  vs one GET stream (s)", "", f"GET {single_s:.3f}", f"{m['restore'] / single_s:.2f}", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"== state {r['state']}: {r['state_source']}",
             f"   target {r['target']}: {r['target_detail']}",
             f"   {m['runner_bytes'] / MB:.1f} MB per runner snapshot, {m['baseline_bytes'] / MB:.1f} MB baseline file; "
             f"median of {r['repeats']}; load avg {r['load_before']:.1f} -> {r['load_after']:.1f}; "
             f"<= 3.5% overhead needs >= {m['stall_async'] / OVERHEAD_FRACTION:.2f} s between saves"]
    for row in rows:
        lines.append("   " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--states", default="example,500mb", help="comma list of: example, 500mb")
    p.add_argument("--targets", default="local,s3", help="comma list of: local, s3")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per case before the repeats")
    p.add_argument("--example", choices=("auto", "voice", "standin"), default="auto",
                   help="the example state: runner.examples.voice if importable (auto), or the stand-in")
    p.add_argument("--tmp", default=None, help="folder for the local target and staging files")
    p.add_argument("--json", dest="json_out", default=None, help="also write every number here")
    p.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a DESIGN target check fails")
    args = p.parse_args(argv)
    states = [s.strip() for s in args.states.split(",") if s.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if bad := [s for s in states if s not in ("example", "500mb")] + [t for t in targets if t not in ("local", "s3")]:
        p.error(f"unknown state/target: {', '.join(bad)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    os.environ.pop("RUNNER_CONTROL_DIR", None)
    root = args.tmp or tempfile.gettempdir()

    print(f"checkpoint_bench: python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} cpus, torch threads {torch.get_num_threads()}", flush=True)
    results = []
    with contextlib.ExitStack() as stack:
        moto = stack.enter_context(MotoS3()) if "s3" in targets else None
        for sname in states:
            bstate = example_state(args.example) if sname == "example" else big_state()
            for tname in targets:
                target: Target = LocalTarget(root) if tname == "local" else S3Target(moto, root)  # type: ignore[arg-type]
                load_before = os.getloadavg()[0]
                try:
                    result = run_case(bstate, target, args.repeats, args.warmup)
                finally:
                    target.close()
                    _free_memory()
                result.update(load_before=load_before, load_after=os.getloadavg()[0])
                results.append(result)
                print(format_case(result), flush=True)
            del bstate
            _free_memory()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"results": results, "argv": sys.argv[1:]}, indent=2))
    missed = not all(c["pass"] for r in results for c in r["checks"].values())
    return 1 if missed and args.fail_on_miss else 0


if __name__ == "__main__":
    sys.exit(main())
