"""torch.distributed.checkpoint's `Metadata` as plain JSON, both ways.

Why: DCP writes its sharding plan (`.metadata`) with pickle and reads it back
with `pickle.load`, so whoever can write the bucket could run code on every
rank that resumes.  We never write `.metadata`; the coordinator turns the
`Metadata` object into this JSON document, which is listed (size, SHA-256) in
the snapshot's manifest like any data file, and restoring parses it with
pydantic into the same dataclasses.  Nothing in it names a class to build:
dtypes, layouts and memory formats are checked against torch's own objects.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

FORMAT = "runner.dcp-metadata"
_DATA_FILE = re.compile(r"__[0-9]+_[0-9]+\.distcp")


class DcpMetadataError(ValueError):
    """A sharding plan that cannot be trusted or understood."""


# Sizes, offsets and positions: whole numbers >= 0, never a bool, float or numeric string.
Count = Annotated[int, Field(ge=0, strict=True)]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Chunk(_Doc):
    offsets: list[Count]
    sizes: list[Count]


class _Entry(_Doc):
    kind: Literal["tensor", "bytes"]
    dtype: str | None = None
    layout: str | None = None
    requires_grad: bool = False
    memory_format: str | None = None
    pin_memory: bool = False
    size: list[Count] = Field(default_factory=list)
    chunks: list[_Chunk] = Field(default_factory=list)


class _Stored(_Doc):
    fqn: str
    offset: list[Count] | None = None
    index: Count | None = None
    relative_path: str
    start: Count
    length: Count
    # DCP's optional per-file transforms (compression extensions): our writer uses none, so none is trusted.
    transforms: list[str] = Field(default_factory=list, max_length=0)

    @field_validator("relative_path")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _DATA_FILE.fullmatch(value):
            raise ValueError(f"{value!r} is not a shard file name")
        return value


class _Document(_Doc):
    format: Literal["runner.dcp-metadata"] = FORMAT
    version: str | None = None
    entries: dict[str, _Entry]
    planner_data: dict[str, list[str | int]] | None = None
    storage: list[_Stored]


def to_json(metadata: Metadata) -> bytes:
    """The sharding plan of a finished save (`StorageWriter.finish`'s `metadata`) as JSON bytes."""
    doc = _Document(
        version=metadata.version,
        entries={fqn: _entry(md) for fqn, md in metadata.state_dict_metadata.items()},
        planner_data=({k: list(v) for k, v in metadata.planner_data.items()}
                      if isinstance(metadata.planner_data, dict) else None),
        storage=[_stored(index, info) for index, info in (metadata.storage_data or {}).items()],
    )
    return json.dumps(doc.model_dump(mode="json"), separators=(",", ":"), sort_keys=True).encode()


def from_json(data: bytes) -> Metadata:
    """Parse a plan written by `to_json`. Raises DcpMetadataError with one clear reason."""
    try:
        doc = _Document.model_validate(json.loads(data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DcpMetadataError(f"not a sharding plan: {_first_error(exc)}") from None
    except RecursionError:  # json.loads on a forged document nested thousands deep
        raise DcpMetadataError("not a sharding plan: nested too deeply") from None
    return Metadata(
        state_dict_metadata={fqn: _storage_md(fqn, entry) for fqn, entry in doc.entries.items()},
        planner_data={k: tuple(v) for k, v in doc.planner_data.items()} if doc.planner_data is not None else None,
        storage_data={_index(s): _StorageInfo(s.relative_path, s.start, s.length, tuple(s.transforms) or None)
                      for s in doc.storage},
        version=doc.version,
    )


def data_files(metadata: Metadata) -> set[str]:
    """The shard files a plan refers to."""
    return {info.relative_path for info in (metadata.storage_data or {}).values()}


def _entry(md: Any) -> _Entry:
    if isinstance(md, BytesStorageMetadata):
        return _Entry(kind="bytes")
    props = md.properties
    return _Entry(kind="tensor", dtype=_name(props.dtype), layout=_name(props.layout),
                  requires_grad=props.requires_grad, memory_format=_name(props.memory_format),
                  pin_memory=props.pin_memory, size=list(md.size),
                  chunks=[_Chunk(offsets=list(c.offsets), sizes=list(c.sizes)) for c in md.chunks])


def _stored(index: MetadataIndex, info: _StorageInfo) -> _Stored:
    return _Stored(fqn=index.fqn, offset=list(index.offset) if index.offset is not None else None,
                   index=index.index, relative_path=info.relative_path, start=info.offset, length=info.length,
                   transforms=list(info.transform_descriptors or ()))


def _storage_md(fqn: str, entry: _Entry) -> Any:
    if entry.kind == "bytes":
        return BytesStorageMetadata()
    props = TensorProperties(dtype=_torch_object(entry.dtype, torch.dtype, fqn),
                             layout=_torch_object(entry.layout, torch.layout, fqn),
                             requires_grad=entry.requires_grad,
                             memory_format=_torch_object(entry.memory_format, torch.memory_format, fqn),
                             pin_memory=entry.pin_memory)
    return TensorStorageMetadata(properties=props, size=torch.Size(entry.size),
                                 chunks=[ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes))
                                         for c in entry.chunks])


def _index(stored: _Stored) -> MetadataIndex:
    offset = torch.Size(stored.offset) if stored.offset is not None else None
    return MetadataIndex(stored.fqn, offset, stored.index)


def _name(value: Any) -> str:
    return str(value).removeprefix("torch.")


def _torch_object(name: str | None, kind: type, fqn: str) -> Any:
    # Only attributes of the torch module that already are objects of the expected kind.
    value = getattr(torch, name, None) if name and name.isidentifier() else None
    if not isinstance(value, kind):
        raise DcpMetadataError(f"entry {fqn!r}: {name!r} is not a torch {kind.__name__}")
    return value


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return str(exc).splitlines()[0][:200]
