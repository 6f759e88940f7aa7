"""The sharding plan as JSON (`dcp_metadata`): DCP's own `Metadata` both ways, no pickle, forged plans refused.

The metadata is real: a small state dict saved by torch.distributed.checkpoint
in this process (no process group).  A sharded snapshot is saved and loaded
through `sharded.save` / `sharded.load` with a one-rank `Group(local=True)`,
the path a plain process takes to restore a torchrun job's snapshot.  Forged
plans are written as an attacker with write access to the bucket would: the
plan edited and the manifest resealed, so every checksum matches.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from runner.checkpoint import layout, sharded
from runner.checkpoint.sharded import dcp_metadata
from runner.checkpoint.sharded.dcp_metadata import DcpMetadataError, from_json, to_json
from runner.checkpoint.manifest import FileEntry, Manifest, Reason
from runner.checkpoint.reader import CorruptSnapshotError, RunReader
from runner.checkpoint.writer import PendingSnapshot
from runner.errors import UnsafeDataError
from runner.storage import Store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP warns that it runs without a process group


def a_state_dict() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "model": {"weight": torch.randn(4, 3), "bias": torch.arange(4, dtype=torch.int64)},
        "half": torch.ones(2, 2, dtype=torch.bfloat16),
        "nested": {"deeper": {"t": torch.linspace(0, 1, 5)}},
        "step": 7,
        "note": b"\x00raw bytes",
        "name": "exp",
    }


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Metadata]:
    """A DCP checkpoint in a folder, and the Metadata DCP wrote for it (read back with DCP's own reader)."""
    folder = tmp_path / "dcp"
    dcp.save(a_state_dict(), storage_writer=FileSystemWriter(str(folder)), no_dist=True)
    return folder, FileSystemReader(str(folder)).read_metadata()


def test_the_json_plan_parses_back_to_dcps_own_metadata(saved):
    _, metadata = saved
    back = from_json(to_json(metadata))
    assert back.state_dict_metadata == metadata.state_dict_metadata
    assert back.storage_data == metadata.storage_data
    assert (back.planner_data, back.version) == (metadata.planner_data, metadata.version)
    assert to_json(back) == to_json(metadata)

    entries = back.state_dict_metadata
    assert {"model.weight", "model.bias", "half", "nested.deeper.t", "step", "note", "name"} == set(entries)
    assert all(isinstance(entries[k], BytesStorageMetadata) for k in ("step", "note", "name"))
    weight = entries["model.weight"]
    assert isinstance(weight, TensorStorageMetadata) and weight.size == torch.Size([4, 3])
    assert weight.properties.dtype is torch.float32 and entries["half"].properties.dtype is torch.bfloat16
    assert entries["model.bias"].properties.dtype is torch.int64
    assert back.planner_data["nested.deeper.t"] == ("nested", "deeper", "t")
    assert dcp_metadata.data_files(back) == {"__0_0.distcp"}


def test_the_plan_is_plain_json_that_names_no_class(saved):
    folder, metadata = saved
    data = to_json(metadata)
    assert data.isascii() and not data.startswith(b"\x80")
    strings: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            strings.extend(value)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            strings.append(value)
        else:
            assert value is None or isinstance(value, (bool, int)), value

    walk(json.loads(data))
    assert not [s for s in strings if s.startswith(("torch", "builtins", "__main__")) or "(" in s]
    # What it replaces: DCP's own .metadata is a pickle, which reading would unpickle.
    assert (folder / ".metadata").read_bytes()[:1] == b"\x80"
    with pytest.raises(DcpMetadataError, match="not a sharding plan"):
        from_json((folder / ".metadata").read_bytes())


def storage_of(doc: dict[str, Any], fqn: str) -> dict[str, Any]:
    return next(s for s in doc["storage"] if s["fqn"] == fqn)


def _set(path: Callable[[dict[str, Any]], dict[str, Any]], key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: path(doc).__setitem__(key, value)


def _top(doc: dict[str, Any]) -> dict[str, Any]:
    return doc


def _weight(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["entries"]["model.weight"]


def _stored(doc: dict[str, Any]) -> dict[str, Any]:
    return storage_of(doc, "model.weight")


FORGERIES = {
    "unknown top-level field": (_set(_top, "reduce", "os.system"), "reduce"),
    "unknown entry field": (_set(_weight, "class", "torch.Tensor"), "class"),
    "unknown storage field": (_set(_stored, "loader", "pickle"), "loader"),
    "another format": (_set(_top, "format", "torch.pickle"), "format"),
    "no storage": (lambda doc: doc.pop("storage"), "storage"),
    "an unknown kind": (_set(_weight, "kind", "object"), "kind"),
    "start as text": (_set(_stored, "start", "zero"), "start"),
    "size as text": (_set(_weight, "size", "4x3"), "size"),
    "planner data with an object": (_set(_top, "planner_data", {"model.weight": [{"a": 1}]}), "planner_data"),
    "a negative start": (_set(_stored, "start", -1), "start"),
    "a negative length": (_set(_stored, "length", -5), "length"),
    "a path out of the snapshot": (_set(_stored, "relative_path", "../x"), "not a shard file name"),
    "a shard name out of the snapshot": (_set(_stored, "relative_path", "../__0_0.distcp"), "not a shard file name"),
    "an absolute path": (_set(_stored, "relative_path", "/etc/__0_0.distcp"), "not a shard file name"),
    "a sub-folder": (_set(_stored, "relative_path", "sub/__0_0.distcp"), "not a shard file name"),
    "DCP's pickled metadata file": (_set(_stored, "relative_path", ".metadata"), "not a shard file name"),
    "another data file": (_set(_stored, "relative_path", "rank-0.pt"), "not a shard file name"),
    "an empty path": (_set(_stored, "relative_path", ""), "not a shard file name"),
    "a module as dtype": (_set(_weight, "dtype", "os"), "'os' is not a torch dtype"),
    "a class as dtype": (_set(_weight, "dtype", "Tensor"), "not a torch dtype"),
    "a dunder as dtype": (_set(_weight, "dtype", "__class__"), "not a torch dtype"),
    "an expression as dtype": (_set(_weight, "dtype", "float32.__class__"), "not a torch dtype"),
    "a dtype as layout": (_set(_weight, "layout", "float32"), "not a torch layout"),
    "a layout as memory format": (_set(_weight, "memory_format", "strided"), "not a torch memory_format"),
    "a tensor without dtype": (_set(lambda doc: doc["entries"]["step"], "kind", "tensor"), "'step'"),
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_plan_is_refused_with_one_line(saved, forgery):
    edit, words = FORGERIES[forgery]
    doc = json.loads(to_json(saved[1]))
    edit(doc)
    with pytest.raises(DcpMetadataError, match=words) as caught:
        from_json(json.dumps(doc).encode())
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("data", [
    b"", b"{", b"\xff\xfe{}", b"[]", b"null", b'"plan"', b"NaN",
    pickle.dumps({"format": "runner.dcp-metadata"}),
], ids=["empty", "truncated", "not-utf8", "list", "null", "string", "nan", "pickle"])
def test_what_is_not_a_plan_is_refused_with_one_line(data):
    with pytest.raises(DcpMetadataError, match="not a sharding plan") as caught:
        from_json(data)
    assert "\n" not in str(caught.value)



def test_a_deeply_nested_document_is_refused_not_a_crash():
    with pytest.raises(DcpMetadataError):
        from_json(b"[" * 100_000)


@pytest.mark.parametrize("field", ["offsets", "sizes"])
def test_negative_chunk_geometry_is_refused(saved, field):
    doc = json.loads(to_json(saved[1]))
    _weight(doc)["chunks"][0][field] = [-2, 3]
    with pytest.raises(DcpMetadataError):
        from_json(json.dumps(doc).encode())


# -- a sharded snapshot, through the JSON plan ------------------------------------------------


class Progress:
    """A component whose state is a nested dict of tensors and plain values."""

    def __init__(self, step: int) -> None:
        self.state = {"step": step, "tag": b"\x00\x01bytes", "name": f"at {step}",
                      "nested": {"seen": torch.full((3,), float(step)), "lr": 0.5 * step}}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def components(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(8, 3)).square().mean().backward()
    optimizer.step()  # Adam has state to save
    return {"model": model, "optimizer": optimizer, "progress": Progress(seed)}


def save_sharded(store: Store, run_id: str, parts: dict[str, Any], step: int = 7) -> Manifest:
    pending = PendingSnapshot(step=step, reason=Reason.MANUAL, components={})
    return sharded.save(store, run_id, sharded.Group(local=True), parts, pending, save_number=1)


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (a, b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b), (a, b)


def test_a_sharded_snapshot_loads_back_through_its_json_plan_without_a_process_group(tmp_path):
    store = Store(str(tmp_path / "bucket"))
    saved = components(seed=7)
    manifest = save_sharded(store, "run", saved)
    assert not torch.distributed.is_initialized()
    assert manifest.sharded and manifest.world_size == 1
    assert {f.path for f in manifest.files} == {"__0_0.distcp", "rank-0.pt", sharded.PLAN_FILE}
    plan = from_json(store.read_bytes(layout.data_key("run", manifest.snapshot_id, sharded.PLAN_FILE)))
    assert dcp_metadata.data_files(plan) == {"__0_0.distcp"}
    assert "progress.nested.seen" in plan.state_dict_metadata

    fresh = components(seed=1)
    assert not torch.equal(fresh["model"][0].weight, saved["model"][0].weight)
    sharded.load(RunReader(store, "run"), RunReader(store, "run").load_manifest(manifest.snapshot_id),
                 sharded.Group(local=True), fresh, strict=True)
    assert_same(saved["model"].state_dict(), fresh["model"].state_dict())
    assert_same(saved["optimizer"].state_dict(), fresh["optimizer"].state_dict())
    assert_same(saved["progress"].state, fresh["progress"].state)


def forge_plan(store: Store, run_id: str, manifest: Manifest, edit: Callable[[dict[str, Any]], None]) -> Manifest:
    """Rewrite the plan and reseal the manifest, as someone who can write the bucket could; the manifest read back."""
    key = layout.data_key(run_id, manifest.snapshot_id, sharded.PLAN_FILE)
    doc = json.loads(store.read_bytes(key))
    edit(doc)
    data = json.dumps(doc).encode()
    store.write_bytes(key, data)
    files = [FileEntry(path=f.path, size=len(data), sha256=hashlib.sha256(data).hexdigest(), component=f.component)
             if f.component == sharded.PLAN_COMPONENT else f for f in manifest.files]
    store.write_bytes(layout.manifest_key(run_id, manifest.snapshot_id),
                      manifest.model_copy(update={"files": files}).sealed().to_bytes())
    return RunReader(store, run_id).load_manifest(manifest.snapshot_id)


@pytest.mark.parametrize("relative_path, words", [
    ("../__0_0.distcp", "not a shard file name"),
    ("__1_0.distcp", "does not list: __1_0.distcp"),  # a well-formed name the manifest does not list
])
def test_a_forged_plan_in_a_snapshot_is_a_corrupt_snapshot(tmp_path, relative_path, words):
    store = Store(str(tmp_path / "bucket"))
    manifest = save_sharded(store, "run", components(seed=7))

    def edit(doc: dict[str, Any]) -> None:
        storage_of(doc, "model.0.weight")["relative_path"] = relative_path

    forged = forge_plan(store, "run", manifest, edit)
    fresh = components(seed=1)
    before = copy.deepcopy(fresh["model"].state_dict())
    with pytest.raises(CorruptSnapshotError, match=words) as caught:
        sharded.load(RunReader(store, "run"), forged, sharded.Group(local=True), fresh, strict=True)
    assert "\n" not in str(caught.value)
    assert_same(before, fresh["model"].state_dict())


class Opaque:
    """Not plain data: loading it takes a full unpickle."""


def test_a_value_that_is_not_plain_data_is_refused_as_unsafe(tmp_path):
    store = Store(str(tmp_path / "bucket"))
    parts = {"progress": Progress(7)}
    parts["progress"].state["opaque"] = Opaque()
    manifest = save_sharded(store, "run", parts)
    fresh = {"progress": Progress(1)}
    fresh["progress"].state["opaque"] = None
    with pytest.raises(UnsafeDataError, match="progress.opaque") as caught:
        sharded.load(RunReader(store, "run"), manifest, sharded.Group(local=True), fresh, strict=True)
    assert "FrameSummary" not in str(caught.value) and "\x1b" not in str(caught.value)
