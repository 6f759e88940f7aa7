"""runner against its peers: the same state checkpointed three ways, same targets, same run.

Owns the side-by-side comparison of issue 14 (items 1 and 5):
- (a) by hand: `torch.save({name: obj.state_dict()})` to a staging file +
  boto3 `upload_file` (default TransferConfig) on S3, or into the folder +
  fsync locally; restore: `download_file` + `torch.load` + `load_state_dict`;
- (b) `torch.distributed.checkpoint.async_save` with its fsspec writer
  (`FsspecWriter`, no process group: one process is DCP's `no_dist` case),
  the DCP tutorial's AppState (`get_state_dict`/`set_state_dict`); restore:
  `dcp.load` with `FsspecReader`;
- (c) runner: `runner.Checkpointer`, a periodic `ckpt.step(n)` with a save
  due, then `ckpt.wait()`; restore: a fresh `Checkpointer(...).restore()`.

Targets: a local folder, moto's S3 server in its own process on loopback
(benchmarks/_moto_process.py), and that server behind a loopback proxy that
caps bandwidth and adds latency per request (benchmarks/_shaping_proxy.py).

Why every save and every restore runs in a child process: a save's peak RSS
is then that method's alone, and a restore starts as a resumed run does, with
nothing cached.  This script is the driver (it holds moto, the proxy and the
table) and, with `--worker`, each child.  Every restore must reproduce the
saved state's checksum, or the script exits 1.

    .venv/bin/python benchmarks/peers.py [--states example,big] [--state-mb 504]
        [--targets local,moto,shaped] [--methods byhand,dcp,runner] [--repeats 3]
        [--rate-mbps 200] [--latency-ms 20] [--json OUT]

See benchmarks/README.md (## peers.py) for what every column means.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import http.client
import io
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _moto import S3_ENV  # noqa: E402
from _moto_process import MotoProcess  # noqa: E402
from _shaping_proxy import ShapingProxy, SinkServer, read_counters  # noqa: E402

MB = 1e6  # sizes and rates are decimal megabytes
METHODS = ("byhand", "dcp", "runner")
LABELS = {"byhand": "(a) torch.save+boto3", "dcp": "(b) DCP async_save", "runner": "(c) runner"}
TARGETS = ("local", "moto", "shaped")
STATES = ("example", "big")
RUN_ID = "peers"
BIG_LAYERS = 10
BYTES_PER_PARAM = 12  # fp32 parameter + Adam's two fp32 moments
CHILD_TIMEOUT_S = 1800


# --------------------------------------------------------------------------
# States (built in the children)


@dataclass
class TrainState:
    name: str
    source: str  # what was built, in words
    components: dict[str, Any]  # registered by name, as runner.Checkpointer takes them
    train_step: Callable[[], None]


def _width_for(state_mb: float) -> int:
    """Width w of BIG_LAYERS x Linear(w, w) whose parameters + Adam moments come to about `state_mb`."""
    return max(64, round(math.sqrt(state_mb * MB / (BIG_LAYERS * BYTES_PER_PARAM)) / 64) * 64)


def build_state(name: str, state_mb: float, trained: bool) -> TrainState:
    """The state after one training step (`trained`), or as a resumed run builds it before restoring."""
    import torch

    torch.manual_seed(0)
    if name == "example":
        from runner.examples import voice

        w = voice.build_workload(voice.VoiceConfig())
        components = {"gpt": w.gpt, "sovits": w.sovits, "optimizer": w.optimizer,
                      "scheduler": w.scheduler, "data": w.batches}

        def voice_step() -> None:
            voice.train_step(w)

        state = TrainState("example", "runner.examples.voice", components, voice_step)
    else:
        width = _width_for(state_mb)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(BIG_LAYERS)])
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step() -> None:
            model(torch.randn(4, width)).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # gradients are not state; free them

        state = TrainState("big", f"{BIG_LAYERS} x Linear({width},{width}) + Adam", {"model": model, "optimizer": opt},
                           step)
    if trained:
        state.train_step()
    return state


def checksum(components: dict[str, Any]) -> str:
    """SHA-256 over every component's state_dict: keys, tensor dtypes, shapes and bytes, other values' repr.

    Tuples and lists hash alike (a store may hand a tuple back as a list).
    """
    import torch

    h = hashlib.sha256()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(obj, dict):
            h.update(b"{")
            for key in sorted(obj, key=str):
                h.update(repr(str(key)).encode())
                walk(obj[key])
            h.update(b"}")
        elif isinstance(obj, (list, tuple)):
            h.update(b"[")
            for item in obj:
                walk(item)
            h.update(b"]")
        else:
            h.update(repr(obj).encode())

    walk({name: obj.state_dict() for name, obj in components.items()})
    return h.hexdigest()


# --------------------------------------------------------------------------
# Where a method writes (the spec the driver hands a child)


@dataclass
class Place:
    """One method's location on one target: a folder, or a bucket prefix on an S3 endpoint."""

    kind: str  # "local" | "s3"
    root: str  # local: the folder; s3: the bucket
    staging: str  # a local folder for staging files (by hand on S3)
    method: str

    def url(self) -> str:
        return f"{self.root}/{self.method}" if self.kind == "local" else f"s3://{self.root}/{self.method}"


# --------------------------------------------------------------------------
# The three methods (run in the children)


class Method:
    """One way to checkpoint `components` at `place`.

    A save child calls prepare_save() (untimed: clients, folders), then
    save(step) -> (stall s, durable s, bytes written) per save; a restore
    child calls restore(step), which makes whatever a fresh process needs.
    """

    def __init__(self, place: Place, components: dict[str, Any]):
        self.place = place
        self.components = components
        # Seconds from the save call until the snapshot is committed (its bytes and
        # metadata durable, what a restore could load), when that comes before save()'s
        # "durable" moment; None: the same moment.
        self.committed_s: float | None = None

    def prepare_save(self) -> None:
        pass

    def save(self, step: int) -> tuple[float, float, int]:
        raise NotImplementedError

    def restore(self, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ByHand(Method):
    """(a) what a user without a library writes: one torch.save file, uploaded with boto3."""

    client = None

    def prepare_save(self) -> None:
        if self.place.kind == "s3":
            self.client = _boto3_client()
        else:
            Path(self.place.url()).mkdir(parents=True, exist_ok=True)

    def _key(self, step: int) -> str:
        return f"{self.place.method}/ckpt-{step}.pt"

    def save(self, step: int) -> tuple[float, float, int]:
        import torch

        started = time.perf_counter()
        bundle = {name: obj.state_dict() for name, obj in self.components.items()}
        if self.place.kind == "local":
            path = Path(self.place.root) / self._key(step)
            with open(path, "wb") as f:
                torch.save(bundle, f)
                f.flush()
                os.fsync(f.fileno())
            size = path.stat().st_size
        else:
            path = Path(self.place.staging) / f"byhand-{step}.pt"
            torch.save(bundle, path)
            size = path.stat().st_size
            assert self.client is not None, "prepare_save() first"
            self.client.upload_file(str(path), self.place.root, self._key(step))
            path.unlink()
        took = time.perf_counter() - started
        return took, took, size  # synchronous: the loop waits for all of it

    def restore(self, step: int) -> None:
        import torch

        if self.place.kind == "local":
            bundle = torch.load(Path(self.place.root) / self._key(step), map_location="cpu", weights_only=True)
        else:
            client = _boto3_client()  # a fresh process makes its own
            path = Path(self.place.staging) / f"byhand-restore-{step}.pt"
            client.download_file(self.place.root, self._key(step), str(path))
            bundle = torch.load(path, map_location="cpu", weights_only=True)
            path.unlink()
        for name, obj in self.components.items():
            obj.load_state_dict(bundle[name])


def _boto3_client():
    import boto3

    return boto3.client("s3")  # AWS_ENDPOINT_URL and the dummy credentials come from the environment


class _DcpAppState:
    """The DCP tutorial's AppState: modules and optimizers through get_state_dict/set_state_dict, the rest as is.

    A `Stateful` (DCP's protocol, checked by shape): dcp.async_save calls state_dict(), dcp.load calls state_dict()
    (for the shapes to load into; DCP gives a fresh optimizer its state first)
    and then load_state_dict().
    """

    def __init__(self, components: dict[str, Any]):
        import torch

        self.modules = torch.nn.ModuleDict({n: c for n, c in components.items() if isinstance(c, torch.nn.Module)})
        self.optimizers = [c for c in components.values() if isinstance(c, torch.optim.Optimizer)]
        self.others = {n: c for n, c in components.items()
                       if not isinstance(c, (torch.nn.Module, torch.optim.Optimizer))}

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.modules, self.optimizers)
        return {"model": model, "optim": optim, **{n: c.state_dict() for n, c in self.others.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.modules, self.optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for name, obj in self.others.items():
            obj.load_state_dict(state[name])


class Dcp(Method):
    """(b) torch.distributed.checkpoint: async_save through FsspecWriter, one process, no process group."""

    def __init__(self, place: Place, components: dict[str, Any]):
        super().__init__(place, components)
        self.app = _DcpAppState(components)
        # One process is DCP's no_dist case; it says so once per call, and that fsync is
        # not possible on an s3fs stream (it relies on the upload completing instead).
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*fsync not supported.*")

    def _path(self, step: int) -> str:
        return f"{self.place.url()}/step-{step}"

    def save(self, step: int) -> tuple[float, float, int]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        started = time.perf_counter()
        future = dcp.async_save({"app": self.app}, storage_writer=FsspecWriter(self._path(step)))
        staged = time.perf_counter()
        future.result()  # the data file and the renamed .metadata are written
        durable = time.perf_counter()
        return staged - started, durable - started, _fsspec_size(self._path(step))

    def restore(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        dcp.load({"app": self.app}, storage_reader=FsspecReader(self._path(step)))


def _fsspec_size(url: str) -> int:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(url)
    return int(fs.du(path, total=True))


class RunnerMethod(Method):
    """(c) runner.Checkpointer: a periodic save in the background, committed when wait() returns."""

    ckpt = None

    def prepare_save(self) -> None:
        import runner

        self.ckpt = runner.Checkpointer(self.place.url(), run_id=RUN_ID, save_every_steps=1, **self.components)

    def save(self, step: int) -> tuple[float, float, int]:
        assert self.ckpt is not None, "prepare_save() first"
        started = time.perf_counter()
        self.ckpt.step(step)  # a save is due every step: host copy, hand-off to the writer thread
        handed = time.perf_counter()
        self.ckpt.wait()
        durable = time.perf_counter()
        commit = self.ckpt.last_commit
        if commit is None or commit.manifest.step != step:
            raise RuntimeError(f"ckpt.step({step}) did not commit a snapshot of step {step}")
        # The manifest is created at the end of write_seconds (on the writer thread, which
        # starts at the hand-off); wait() also waits for retention after it.
        self.committed_s = handed - started + commit.write_seconds
        return handed - started, durable - started, sum(f.size for f in commit.manifest.files)

    def restore(self, step: int) -> None:
        import runner

        self.ckpt = runner.Checkpointer(self.place.url(), run_id=RUN_ID, **self.components)
        restored = self.ckpt.restore()
        if restored != step:
            raise RuntimeError(f"runner restored step {restored}, expected {step}")

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()


METHOD_CLASSES: dict[str, type[Method]] = {"byhand": ByHand, "dcp": Dcp, "runner": RunnerMethod}


# --------------------------------------------------------------------------
# Memory of a child


def free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM, which ru_maxrss reads) to the current RSS; False if the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------
# The children: one save, one restore, one ceiling probe


def worker_save(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the trained state, make `warmup` untimed saves, then the timed one; peak RSS of the saves."""
    from runner.checkpoint.state import tensor_bytes as state_tensor_bytes
    ready = spec["ready"]
    state = build_state(spec["state"], spec["state_mb"], trained=True)
    built = time.time()
    expected = checksum(state.components)
    free_memory()
    peak_reset = reset_peak_rss()
    rss_after_build_kb = _status_kb("VmRSS")
    method = METHOD_CLASSES[spec["method"]](Place(**spec["place"]), state.components)
    method.prepare_save()
    for step in range(1, spec["warmup"] + 1):
        method.save(step)
    step = spec["warmup"] + 1
    counted = RequestCount(spec.get("counters_url"))
    stall, durable, written = method.save(step)
    requests = counted.since()
    method.close()
    committed = durable if method.committed_s is None else method.committed_s
    return {"checksum": expected, "step": step, "stall_s": stall, "durable_s": durable, "committed_s": committed,
            "bytes": written,
            "requests": requests,
            "state_bytes": state_tensor_bytes({n: c.state_dict() for n, c in state.components.items()}),
            "source": state.source, "peak_reset": peak_reset,
            "rss_after_build_MB": rss_after_build_kb * 1024 / MB,
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
            "startup_s": ready - spec["spawned"], "build_s": built - ready}


def worker_restore(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the state as a resumed run would (untrained), restore it, run one step; time both parts."""
    ready = spec["ready"]
    state = build_state(spec["state"], spec["state_mb"], trained=False)
    built = time.time()
    before = checksum(state.components)
    free_memory()
    counted = RequestCount(spec.get("counters_url"))
    started = time.perf_counter()
    method = METHOD_CLASSES[spec["method"]](Place(**spec["place"]), state.components)
    method.restore(spec["step"])
    restored = time.perf_counter()
    requests = counted.since()
    got = checksum(state.components)  # not timed: between the restore and the step
    stepping = time.perf_counter()
    state.train_step()
    stepped = time.perf_counter()
    method.close()
    return {"checksum": got, "checksum_before": before, "requests": requests, "restore_s": restored - started,
            "first_step_s": stepped - stepping, "to_first_step_s": (restored - started) + (stepped - stepping),
            "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
            "startup_s": ready - spec["spawned"], "build_s": built - ready}


class RequestCount:
    """Requests and bytes through the shaping proxy since this was made (nothing without a proxy)."""

    def __init__(self, counters_url: str | None):
        self.url = counters_url
        self.start = read_counters(counters_url) if counters_url else None

    def since(self) -> dict[str, int]:
        if not self.url or self.start is None:
            return {}
        now = read_counters(self.url)
        return {k: now[k] - self.start[k] for k in now}


def worker_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Throughput of `mb` MB up and down: boto3 (default TransferConfig) per S3 endpoint, one stream via the sink."""
    data = os.urandom(int(spec["mb"] * MB))
    out = {}
    for label, endpoint in spec["s3"].items():
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        started = time.perf_counter()
        client.upload_fileobj(io.BytesIO(data), spec["bucket"], f"probe/{label}")
        uploaded = time.perf_counter()
        buffer = io.BytesIO()
        client.download_fileobj(spec["bucket"], f"probe/{label}", buffer)
        downloaded = time.perf_counter()
        if buffer.getvalue() != data:
            raise RuntimeError(f"probe through {label}: the download differs from the upload")
        out[label] = {"up_MBps": len(data) / MB / (uploaded - started),
                      "down_MBps": len(data) / MB / (downloaded - uploaded)}
    if spec.get("sink"):
        out["proxy alone"] = _one_stream(spec["sink"], data)
    return out


def _one_stream(url: str, data: bytes) -> dict[str, float]:
    """One PUT and one GET of len(data) bytes over one connection (to the sink, through the proxy)."""
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port)
    started = time.perf_counter()
    conn.request("PUT", "/probe", body=data)
    conn.getresponse().read()
    uploaded = time.perf_counter()
    conn.request("GET", f"/probe?bytes={len(data)}")
    got = len(conn.getresponse().read())
    downloaded = time.perf_counter()
    conn.close()
    if got != len(data):
        raise RuntimeError(f"sink returned {got} bytes, asked for {len(data)}")
    return {"up_MBps": len(data) / MB / (uploaded - started), "down_MBps": len(data) / MB / (downloaded - uploaded)}


WORKERS = {"save": worker_save, "restore": worker_restore, "probe": worker_probe}


def preimport(state: str | None) -> None:
    """Import everything a method uses up front, so that no timed figure pays for an import."""
    import boto3  # noqa: F401
    import s3fs  # noqa: F401
    import torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.checkpoint._fsspec_filesystem  # noqa: F401
    import torch.distributed.checkpoint.state_dict  # noqa: F401

    import runner.checkpoint.checkpointer  # noqa: F401

    if state == "example":
        import runner.examples.voice  # noqa: F401


def worker_main(kind: str, spec_json: str, out: str) -> int:
    os.environ.pop("RUNNER_CONTROL_DIR", None)
    import logging

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(spec_json)
    preimport(spec.get("state"))
    if os.environ.get("PEERS_TORCH_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["PEERS_TORCH_THREADS"]))
    spec["ready"] = time.time()  # start-up and imports end here
    result = WORKERS[kind](spec)
    Path(out).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------
# The driver: targets


class Target:
    """Where one case writes: a fresh place per method and repeat, dropped after its restore."""

    name = ""

    def new_place(self, method: str) -> Place: ...
    def drop(self, place: Place) -> None: ...
    def env(self) -> dict[str, str]: return {}
    def describe(self) -> str: ...
    def counters_url(self) -> str | None: return None


class LocalTarget(Target):
    name = "local"

    def __init__(self, root: str):
        self.root = root

    def new_place(self, method: str) -> Place:
        folder = tempfile.mkdtemp(prefix="runner-peers-", dir=self.root)
        return Place("local", folder, folder, method)

    def drop(self, place: Place) -> None:
        shutil.rmtree(place.root, ignore_errors=True)

    def describe(self) -> str:
        return f"local folder under {self.root}"


class MotoTarget(Target):
    """moto in its own process, reached directly (`moto`) or through the shaping proxy (`shaped`)."""

    def __init__(self, name: str, moto: MotoProcess, root: str, proxy: ShapingProxy | None = None):
        self.name = name
        self.moto = moto
        self.root = root
        self.proxy = proxy

    def new_place(self, method: str) -> Place:
        self.moto.reset()
        return Place("s3", self.moto.new_bucket(), tempfile.mkdtemp(prefix="runner-peers-staging-", dir=self.root),
                     method)

    def drop(self, place: Place) -> None:
        shutil.rmtree(place.staging, ignore_errors=True)
        self.moto.reset()  # moto holds every object in its memory

    def env(self) -> dict[str, str]:
        return self.moto.env(self.proxy.url if self.proxy else None)

    def describe(self) -> str:
        where = f"moto {self.moto.endpoint} (own process, loopback)"
        if self.proxy is None:
            return where
        rate = f"{self.proxy.rate_Bps / MB:.0f} MB/s" if self.proxy.rate_Bps else "no cap"
        return f"{where} through the shaping proxy {self.proxy.url}: {rate} per direction, " \
               f"{self.proxy.latency_s * 1000:.0f} ms per request"

    def counters_url(self) -> str | None:
        return self.proxy.url if self.proxy else None


# --------------------------------------------------------------------------
# The driver: children


CHILD_THREADS: int | None = None  # --threads, for every child


def child_env(target_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RUNNER_") and k not in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")}
    env.update(target_env)
    env["PYTHONUNBUFFERED"] = "1"
    if CHILD_THREADS is not None:
        env["OMP_NUM_THREADS"] = env["PEERS_TORCH_THREADS"] = str(CHILD_THREADS)
    return env


def run_child(kind: str, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Run one worker; its result, or SystemExit with the tail of its stderr."""
    with tempfile.NamedTemporaryFile(prefix="runner-peers-", suffix=".json", delete=False) as f:
        out = f.name
    try:
        spec = dict(spec, spawned=time.time())
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec), "--out", out],
                              env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
            raise SystemExit(f"peers: the {kind} child ({spec.get('method', '')}) exited {proc.returncode}:\n{tail}")
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def run_method(state: str, state_mb: float, target: Target, method: str, warmup: int) -> dict[str, Any]:
    """One save child, then one restore child, on a fresh place; the two results merged and checked."""
    place = target.new_place(method)
    env = child_env(target.env())
    common = {"state": state, "state_mb": state_mb, "method": method, "place": place.__dict__,
              "counters_url": target.counters_url()}
    try:
        saved = run_child("save", dict(common, warmup=warmup), env)
        restored = run_child("restore", dict(common, step=saved["step"]), env)
    finally:
        target.drop(place)
    return {"save": saved, "restore": restored, "ok": restored["checksum"] == saved["checksum"],
            "restore_changed_state": restored["checksum_before"] != saved["checksum"]}


def run_case(state: str, state_mb: float, target: Target, methods: list[str], repeats: int,
             warmup: int) -> dict[str, Any]:
    """Every method on one state and target, `repeats` times, the order reversed every other repeat."""
    load_before = os.getloadavg()[0]
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    orders = []
    for rep in range(repeats):
        order = methods if rep % 2 == 0 else methods[::-1]
        orders.append(list(order))
        for method in order:
            samples[method].append(run_method(state, state_mb, target, method, warmup))
    return {"state": state, "target": target.name, "target_detail": target.describe(), "repeats": repeats,
            "warmup": warmup, "orders": orders, "load_before": load_before, "load_after": os.getloadavg()[0],
            "methods": {m: summarise(s) for m, s in samples.items()}, "samples": samples}


def summarise(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of one method's repeats (and whether every restore reproduced its save)."""

    def med(part: str, key: str) -> float:
        return statistics.median(float(s[part][key]) for s in samples)

    def med_requests(part: str) -> float | None:
        counts = [s[part]["requests"]["requests"] for s in samples if s[part]["requests"]]
        return statistics.median(counts) if counts else None

    save_keys = ("stall_s", "committed_s", "durable_s", "bytes", "state_bytes", "peak_rss_MB", "rss_after_build_MB", "startup_s",
                 "build_s")
    restore_keys = ("restore_s", "first_step_s", "to_first_step_s", "peak_rss_MB", "startup_s", "build_s")
    out: dict[str, Any] = {f"save_{k}": med("save", k) for k in save_keys}
    out.update({f"restore_{k}": med("restore", k) for k in restore_keys})
    out["save_added_MB"] = statistics.median(s["save"]["peak_rss_MB"] - s["save"]["rss_after_build_MB"]
                                             for s in samples)
    out["requests_save"] = med_requests("save")
    out["requests_restore"] = med_requests("restore")
    out["source"] = samples[0]["save"]["source"]
    out["peak_reset"] = all(s["save"]["peak_reset"] for s in samples)
    out["ok"] = all(s["ok"] for s in samples)
    out["restore_changed_state"] = all(s["restore_changed_state"] for s in samples)
    return out


# --------------------------------------------------------------------------
# The driver: the proxy's ceiling


def probe_ceiling(moto: MotoProcess, shaped: ShapingProxy, mb: float) -> dict[str, Any]:
    """What moto, the proxy without a cap, and the proxy with the cap pass (one child, boto3), and the proxy alone."""
    with ShapingProxy(moto.endpoint) as open_proxy, SinkServer() as sink, ShapingProxy(sink.url) as sink_proxy:
        moto.reset()
        bucket = moto.new_bucket("probe")
        spec = {"mb": mb, "bucket": bucket, "sink": sink_proxy.url,
                "s3": {"moto direct": moto.endpoint, "proxy, no cap": open_proxy.url, "proxy, capped": shaped.url}}
        result = run_child("probe", spec, child_env(moto.env()))
        moto.reset()
    return {"mb": mb, "rates": result}


def format_ceiling(c: dict[str, Any], rate_mbps: float, latency_ms: float) -> str:
    rates = "; ".join(f"{label} {r['up_MBps']:.0f}/{r['down_MBps']:.0f}" for label, r in c["rates"].items())
    return (f"proxy: cap {rate_mbps:.0f} MB/s per direction, {latency_ms:.0f} ms per request; "
            f"ceiling, {c['mb']:.0f} MB up/down in MB/s (boto3, default TransferConfig; "
            f"'proxy alone' = one stream to a sink): {rates}")


# --------------------------------------------------------------------------
# The driver: report


def _ratio(m: dict[str, Any], base: dict[str, Any] | None, key: str) -> str:
    """m[key] / base[key]; "-" without the by-hand baseline (not in --methods) or when it is 0."""
    return f"{m[key] / base[key]:.2f}" if base and base[key] > 0 else "-"


def format_case(r: dict[str, Any]) -> str:
    ms = r["methods"]
    base = ms.get("byhand")
    rows = [("method", "MB stored", "stall s", "ratio", "committed s", "ratio", "durable s", "ratio",
             "restore->step s", "ratio",
             "peak RSS MB", "+save MB", "ratio", "requests save/restore", "checksum")]
    for name, m in ms.items():
        requests = "" if m["requests_save"] is None else f"{m['requests_save']:.0f}/{m['requests_restore']:.0f}"
        rows.append((LABELS[name], f"{m['save_bytes'] / MB:.1f}",
                     f"{m['save_stall_s']:.3f}", _ratio(m, base, "save_stall_s"),
                     f"{m['save_committed_s']:.3f}", _ratio(m, base, "save_committed_s"),
                     f"{m['save_durable_s']:.3f}", _ratio(m, base, "save_durable_s"),
                     f"{m['restore_to_first_step_s']:.3f}", _ratio(m, base, "restore_to_first_step_s"),
                     f"{m['save_peak_rss_MB']:.0f}", f"{m['save_added_MB']:.0f}",
                     _ratio(m, base, "save_peak_rss_MB"), requests,
                     "ok" if m["ok"] else "MISMATCH"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    first = next(iter(ms.values()))
    startup = statistics.median(m["restore_startup_s"] for m in ms.values())
    build = statistics.median(m["restore_build_s"] for m in ms.values())
    step = statistics.median(m["restore_first_step_s"] for m in ms.values())
    lines = [f"== state {r['state']}: {first['source']} after 1 step, "
             f"{first['save_state_bytes'] / MB:.1f} MB of tensors",
             f"   target {r['target']}: {r['target_detail']}",
             f"   median of {r['repeats']} (order flips every repeat), {r['warmup']} untimed save(s) first in each "
             f"save child; load avg {r['load_before']:.1f} -> {r['load_after']:.1f}",
             f"   not in the figures: child start-up + imports {startup:.2f} s, building the state {build:.2f} s; "
             f"in restore->step: one training step {step:.3f} s"]
    lines += ["   " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if not first["peak_reset"]:
        lines.append("   (peak RSS could not be reset after building the state: it includes the build's peak)")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The driver: main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--states", default="example,big", help=f"comma list of: {', '.join(STATES)}")
    p.add_argument("--state-mb", type=float, default=504.0,
                   help=f"size of the big state: {BIG_LAYERS} x Linear(w, w) + Adam, w from this (504: w = 2048)")
    p.add_argument("--targets", default="local,moto,shaped", help=f"comma list of: {', '.join(TARGETS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of: {', '.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed saves in each save child before the timed one")
    p.add_argument("--rate-mbps", type=float, default=200.0, help="the shaped target's cap, MB/s per direction")
    p.add_argument("--latency-ms", type=float, default=20.0, help="the shaped target's added latency per request")
    p.add_argument("--probe-mb", type=float, default=100.0, help="bytes each way when measuring the proxy's ceiling")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (and OMP_NUM_THREADS) in every child; default: torch's own choice")
    p.add_argument("--tmp", default=None, help="folder for the local target and staging files")
    p.add_argument("--json", dest="json_out", default=None, help="also write every number here")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.states = [s.strip() for s in args.states.split(",") if s.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = ([s for s in args.states if s not in STATES] + [t for t in args.targets if t not in TARGETS]
           + [m for m in args.methods if m not in METHODS])
    if bad:
        p.error(f"unknown state/target/method: {', '.join(bad)}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.repeats < 1 or args.warmup < 0 or args.state_mb <= 0 or args.rate_mbps < 0 or args.latency_ms < 0:
        p.error("--repeats must be >= 1; --warmup, --rate-mbps and --latency-ms >= 0; --state-mb > 0")
    return args


def header(threads: int | None) -> str:
    import torch

    chosen = threads if threads is not None else f"{torch.get_num_threads()} (torch's default)"
    return (f"peers: python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} cpus, "
            f"torch threads {chosen}; every save and restore in a fresh child process")


def main(argv: list[str] | None = None) -> int:
    global CHILD_THREADS
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.out)
    CHILD_THREADS = args.threads
    root = args.tmp or tempfile.gettempdir()
    print(header(args.threads), flush=True)
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {"argv": sys.argv[1:], "header": header(args.threads), "results": results}
    with contextlib.ExitStack() as stack:
        s3_needed = any(t != "local" for t in args.targets)
        moto = stack.enter_context(MotoProcess()) if s3_needed else None
        shaped = None
        if "shaped" in args.targets:
            assert moto is not None
            shaped = stack.enter_context(ShapingProxy(moto.endpoint, rate_Bps=args.rate_mbps * MB or None,
                                                      latency_s=args.latency_ms / 1000))
            report["ceiling"] = probe_ceiling(moto, shaped, args.probe_mb)
            print(format_ceiling(report["ceiling"], args.rate_mbps, args.latency_ms), flush=True)
        targets: dict[str, Target] = {"local": LocalTarget(root)}
        if moto is not None:
            targets["moto"] = MotoTarget("moto", moto, root)
            targets["shaped"] = MotoTarget("shaped", moto, root, shaped)
        for state in args.states:
            for tname in args.targets:
                result = run_case(state, args.state_mb, targets[tname], args.methods, args.repeats, args.warmup)
                results.append(result)
                print(format_case(result), flush=True)
        if moto is not None:
            report["moto_peak_rss_MB"] = _peak_rss_of(moto.pid)
    report["driver_peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return verdict(results)


def _peak_rss_of(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    return None


def verdict(results: list[dict[str, Any]]) -> int:
    """1 when a restore did not reproduce its save (or did not change the fresh state at all), else 0."""
    failed = [f"{r['state']}/{r['target']}/{name}" for r in results for name, m in r["methods"].items()
              if not (m["ok"] and m["restore_changed_state"])]
    if failed:
        print(f"peers: restore did not reproduce the saved state (checksum) for: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("peers: every restore reproduced the saved state (checksum of every component's state_dict)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
