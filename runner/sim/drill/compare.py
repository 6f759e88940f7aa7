"""Finding a run's final snapshot and comparing two of them, component file by component file.

Why hashes first, values second: the training state, RNG streams included,
is serialized with torch.save, whose bytes are a function of the state
(equal state saved by two processes gives equal bytes; the drill's own test
on the example shows every file byte-equal), so equal SHA-256s in the two
manifests mean equal state, and both snapshots are read in full and checked
against them first.  When the hashes differ, the two files are loaded
(weights_only) and compared tensor by tensor, bitwise: that says *what*
differs (a tensor, an RNG stream), and state that is equal but serialized
differently still counts as equal.  torch is imported only then.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from runner.checkpoint.manifest import FileEntry, Manifest
from runner.checkpoint.reader import CorruptSnapshotError, RunReader, newest_preferring_final
from runner.sim.drill.report import ComponentResult

_RNG_COMPONENT = "_rng"  # runner.checkpoint.state.RNG_COMPONENT (not imported: it needs torch)


def final_snapshot(reader: RunReader) -> Manifest | None:
    found = newest_preferring_final(reader)
    return found if found is not None and found.final else None


def compare_final(ref_reader: RunReader, ref: Manifest, reader: RunReader, final: Manifest,
                  ignore: Sequence[str] = ()) -> list[ComponentResult]:  # fmt: skip
    """Every component file of both snapshots, compared (see the module docstring for how).

    Raises CorruptSnapshotError when either snapshot does not match its manifest.
    """
    for r, m in ((ref_reader, ref), (reader, final)):
        problem = r.verify(m)
        if problem:
            raise CorruptSnapshotError(f"final snapshot {m.snapshot_id} of run {r.run_id} is corrupt: {problem}")
    a, b = _by_component(ref), _by_component(final)
    results = []
    for name in sorted(set(a) | set(b), key=lambda n: (n == _RNG_COMPONENT, n)):
        fa, fb = a.get(name), b.get(name)
        sha_a, sha_b = (fa.sha256 if fa else None), (fb.sha256 if fb else None)
        if name in ignore:
            results.append(ComponentResult(name, sha_a, sha_b, "ignored", "--ignore"))
        elif fa is None or fb is None:
            where = "reference" if fa is None else "interrupted"
            results.append(ComponentResult(name, sha_a, sha_b, "missing", f"not in the {where} run's final snapshot"))
        elif sha_a == sha_b:
            results.append(ComponentResult(name, sha_a, sha_b, "same-bytes"))
        else:
            difference = _load_and_compare(ref_reader.read_file(ref, fa), reader.read_file(final, fb), name)
            results.append(ComponentResult(name, sha_a, sha_b, "different" if difference else "same-values",
                                           difference or "equal values, serialized differently"))  # fmt: skip
    return results


def _by_component(manifest: Manifest) -> dict[str, FileEntry]:
    return {(f.component or f.path): f for f in manifest.files}


def _load_and_compare(data_a: bytes, data_b: bytes, name: str) -> str | None:
    """None when the two files hold bitwise equal state; else where they first differ."""
    from runner.checkpoint import state  # torch, only when hashes differ

    try:
        a, b = state.deserialize(data_a), state.deserialize(data_b)
    except state.UnsafeDataError:
        return "the files differ (not tensor files, so not compared by value)"
    where = first_difference(a, b)
    if where is None:
        return None
    if name == _RNG_COMPONENT:
        stream = where.split("[", 1)[0].split(".", 1)[0] or "an RNG"
        return (f"the {stream} RNG stream differs ({where}): the command draws from it without "
                f"seeding it the same way each run, or does not restore it")
    return f"first difference at {where}"


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two loaded states first differ, bit for bit ("key.sub[2]: what"), or None when equal."""
    found = _difference(a, b, path)
    return f"the top level{found}" if found is not None and found.startswith(":") else found


def _difference(a: Any, b: Any, path: str) -> str | None:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: a tensor and a {type(b if isinstance(a, torch.Tensor) else a).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if a.numel() and not torch.equal(_bits(a), _bits(b)):
            return f"{path}: values differ"
        return None
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            extra = sorted(map(str, set(a) ^ set(b)))[:5]
            return f"{path}: keys differ ({', '.join(extra)})"
        for key in sorted(a, key=str):
            found = _difference(a[key], b[key], f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            found = _difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(a, float) and isinstance(b, float):
        return None if struct.pack("<d", a) == struct.pack("<d", b) else f"{path}: {a!r} vs {b!r}"
    if type(a) is not type(b) or a != b:
        return f"{path}: {a!r} vs {b!r}"[:200]
    return None


def _bits(t: Any) -> Any:
    """The tensor's raw bytes as a uint8 tensor (so NaN == NaN and -0.0 != 0.0)."""
    import torch

    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
