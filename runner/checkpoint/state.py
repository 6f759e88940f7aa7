"""Capturing and restoring the training state (the only torch-aware part).

Capture copies every tensor of every registered component to host memory, so
the training loop may go on mutating its tensors while the copy is written in
the background.  Serialization is `torch.save`; deserialization is
`torch.load(weights_only=True)`, which refuses anything but tensors and plain
containers, so a data file from the bucket can never run code.

Why host buffers are reused (`HostBuffers`): copying 500 MB into freshly
allocated memory costs several times the copy into memory already touched
(page faults), and that copy is the training stall.  A capture copies into the
previous capture's tensors when a tensor's shape, dtype and strides match, and
CUDA tensors go to pinned buffers with asynchronous copies and one synchronize.
The buffers are lent to the writer with the capture and given back when the
snapshot is written, so a capture never overwrites a snapshot being written:
with the buffers out, it allocates fresh memory instead.  Keeping them costs
one more copy of the state in host memory between saves, so by default
(`keep_host_copy=None`) a state over a quarter of physical memory is not kept
(`HOST_COPY_RAM_FRACTION`; True keeps any size, False never keeps).

Why `serialize_into` streams into a file object: `torch.save` into
`io.BytesIO` copies every byte under the GIL and holds the whole file in
memory; through a small hashing writer into a store's upload (`Store.open_upload`:
multipart parts sent while serialization goes on, or a spool file) the SHA-256
of large buffers and the file writes release the GIL, and on S3 the bytes are
on their way before `torch.save` returns.

RNG streams (python, numpy, torch CPU, every CUDA device) are captured as an
implicit component named `_rng`, in forms `weights_only` accepts.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import random
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from runner.errors import StateMismatchError, UnsafeDataError

RNG_COMPONENT = "_rng"
# keep_host_copy=None (the default) keeps the host copy of a state up to this share of
# physical memory: two copies of it then fit beside the rest of a training process.
HOST_COPY_RAM_FRACTION = 0.25

log = logging.getLogger("runner.checkpoint")


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


@dataclass
class LoadReport:
    """What a non-strict model restore could not load."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape-mismatched", self.mismatched)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:20])}{' …' if len(keys) > 20 else ''}")
        return "; ".join(parts) or "all keys matched"


def host_copy(obj: Any) -> Any:
    """A deep copy with every tensor copied to CPU memory (what the loop waits for)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, host_copy(v)) for k, v in obj.items())
    if isinstance(obj, Mapping):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [host_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(host_copy(v) for v in obj)
    return obj


class HostBuffers:
    """The host memory of the last capture, to be copied into by the next one.

    `capture(..., buffers)` takes what is here and leaves it empty; whoever
    writes that capture calls `give_back(captured)` once it is written (or has
    failed).  A capture that finds it empty (the first, or one while a write is
    in flight) allocates fresh memory, so reuse can never alias a snapshot that
    is still being written.

    `limit_bytes`: a capture whose tensors hold more than this is not kept
    (the next capture allocates fresh memory, and between saves the process
    holds one copy of the state instead of two).  None keeps any size.
    """

    def __init__(self, limit_bytes: int | None = None) -> None:
        self._lock = threading.Lock()
        self._free: dict[str, Any] | None = None
        self.limit_bytes = limit_bytes
        self.refused_bytes: int | None = None  # the size of the last capture too large to keep

    def take(self) -> dict[str, Any] | None:
        with self._lock:
            free, self._free = self._free, None
            return free

    def give_back(self, captured: dict[str, Any]) -> None:
        size = tensor_bytes(captured) if self.limit_bytes is not None else 0
        if self.limit_bytes is not None and size > self.limit_bytes:
            if self.refused_bytes is None:
                log.info("the captured state (%.1f GiB) is over the host copy limit (%.1f GiB): "
                         "not kept between saves", size / 2**30, self.limit_bytes / 2**30)
            self.refused_bytes = size
            captured = None
        with self._lock:
            self._free = captured


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a (nested) state."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def host_copy_limit(fraction: float | None = None) -> int | None:
    """The default limit of a kept host copy: `fraction` (default HOST_COPY_RAM_FRACTION) of physical memory.

    None when the machine does not say how much memory it has.
    """
    fraction = HOST_COPY_RAM_FRACTION if fraction is None else fraction
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return int(total * fraction) if total > 0 else None


class _Copier:
    """One capture's copies: into the previous capture's tensors where they fit, else fresh."""

    def __init__(self) -> None:
        self.cuda_devices: set[torch.device] = set()

    def copy(self, obj: Any, old: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, old)
        if isinstance(obj, Mapping):
            olds = old if isinstance(old, Mapping) else {}
            items = ((k, self.copy(v, olds.get(k))) for k, v in obj.items())
            return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
        if isinstance(obj, (list, tuple)):
            olds = old if isinstance(old, (list, tuple)) and len(old) == len(obj) else [None] * len(obj)
            copied = [self.copy(v, o) for v, o in zip(obj, olds)]
            return copied if isinstance(obj, list) else tuple(copied)
        return obj

    def tensor(self, t: torch.Tensor, old: Any) -> torch.Tensor:
        t = t.detach()
        plain = (type(t) is torch.Tensor and t.layout == torch.strided and not t.is_quantized
                 and not t.is_conj() and not t.is_neg())
        cuda = plain and t.device.type == "cuda"
        if not (plain and (cuda or t.device.type == "cpu")):
            return t.to("cpu", copy=True)
        if not (type(old) is torch.Tensor and old.device.type == "cpu" and old.dtype == t.dtype
                and old.shape == t.shape and old.stride() == t.stride() and (not cuda or old.is_pinned())):
            old = self._fresh(t) if cuda else None
            if old is None:
                return t.to("cpu", copy=True)
        if cuda:
            old.copy_(t, non_blocking=True)
            self.cuda_devices.add(t.device)
        else:
            old.copy_(t)
        return old

    @staticmethod
    def _fresh(t: torch.Tensor) -> torch.Tensor | None:
        """A pinned host tensor laid out as `t`, or None (not dense, or pinning failed)."""
        if not t.is_contiguous():
            return None
        try:
            return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        except RuntimeError:
            return None

    def finish(self) -> None:
        """Wait for the asynchronous device-to-host copies."""
        for device in self.cuda_devices:
            torch.cuda.synchronize(device)


def capture_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    np.random.set_state({
        "bit_generator": npst["bit_generator"],
        "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
        "has_gauss": npst["has_gauss"],
        "gauss": npst["gauss"],
    })
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        # Restore as many devices as both sides have; a different GPU count is allowed.
        for index, rng in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng, index)


def capture(components: Mapping[str, Stateful], buffers: HostBuffers | None = None) -> dict[str, Any]:
    """Host-memory copies of every component's state, plus the RNG streams.

    With `buffers`, copies into the previous capture's memory where it fits
    (see HostBuffers); the caller gives the result back once it is written.
    """
    if buffers is None:
        out = {name: host_copy(obj.state_dict()) for name, obj in components.items()}
    else:
        old = buffers.take() or {}
        copier = _Copier()
        out = {name: copier.copy(obj.state_dict(), old.get(name)) for name, obj in components.items()}
        copier.finish()
    out[RNG_COMPONENT] = capture_rng()
    return out


def serialize(state: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class _HashingWriter:
    """A write-only file object that hashes what passes through (torch.save's target)."""

    def __init__(self, file: Any):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.sha256.update(data)  # releases the GIL for buffers over 2 KiB, as the file write does
        written = self.file.write(data)  # bytes, as a file's write returns
        self.size += written
        return written

    def flush(self) -> None:
        self.file.flush()


def serialize_into(state: Any, file: Any) -> tuple[int, str]:
    """`serialize(state)` streamed into the writable file object `file` (the same bytes); returns (size, SHA-256 hex)."""
    writer = _HashingWriter(file)
    torch.save(state, writer)
    return writer.size, writer.sha256.hexdigest()


def serialize_to(state: Any, path: str) -> tuple[int, str]:
    """`serialize(state)` streamed into the file `path`; returns (size, SHA-256 hex)."""
    with open(path, "wb") as f:
        return serialize_into(state, f)


def deserialize(data: bytes, map_location: Any = "cpu") -> Any:
    """Load bytes written by `serialize`. Raises UnsafeDataError for anything that is not plain data."""
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeDataError(f"refusing to load: it holds more than tensors and plain data ({unpickling_reason(exc)})") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise UnsafeDataError(f"cannot read it as a tensor file ({_first_line(exc)})") from None


def check_kind(name: str, obj: Any, state: Any) -> None:
    """Raise UnsafeDataError when a loaded state cannot be what `obj` (or the RNG capture) saved.

    A file whose checksum matches may still be foreign or forged (whoever
    writes the bucket writes the manifest too); this catches it before any
    component is touched, for the kinds whose shape we know.
    """
    if name == RNG_COMPONENT:
        ok = isinstance(state, Mapping) and {"python", "numpy", "torch"} <= set(state)
    elif isinstance(obj, torch.nn.Module):  # values may be any `get_extra_state()` object, keys are names
        ok = isinstance(state, Mapping) and all(isinstance(k, str) for k in state)
    else:
        return
    if not ok:
        raise UnsafeDataError(f"it does not hold a {'RNG' if name == RNG_COMPONENT else 'module'} state for {name!r}")


def load_into(name: str, obj: Stateful, state: Any, strict: bool) -> LoadReport:
    """Load `state` into `obj`. Modules get a precise structure check first.

    Raises StateMismatchError when strict and the structure differs.
    """
    if name == RNG_COMPONENT:
        restore_rng(state)
        return LoadReport()
    if isinstance(obj, torch.nn.Module):
        return _load_module(name, obj, state, strict)
    obj.load_state_dict(state)
    return LoadReport()


def _load_module(name: str, module: torch.nn.Module, state: Mapping[str, Any], strict: bool) -> LoadReport:
    own = module.state_dict()
    report = LoadReport(
        missing=sorted(k for k in own if k not in state),
        unexpected=sorted(k for k in state if k not in own),
        mismatched=sorted(
            f"{k} {tuple(state[k].shape)}->{tuple(own[k].shape)}"
            for k in own
            if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
        ),
    )
    if strict and not report.clean:
        raise StateMismatchError(
            f"component {name!r} does not match the snapshot ({report.describe()}); "
            "pass strict=False to load what matches"
        )
    mismatched = {m.split(" ", 1)[0] for m in report.mismatched}
    module.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
    return report


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def unpickling_reason(exc: BaseException) -> str:
    """What `weights_only` refused (torch's message is a page of advice; the reason is one line of it)."""
    lines = [_ANSI.sub("", line).strip() for line in str(exc).splitlines()]
    for line in lines:
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line[:200]
    return next((line[:200] for line in lines if line), type(exc).__name__)
