"""The snapshot manifest: a small, versioned, self-hashed JSON document.

The manifest is the commit record of a snapshot.  It is validated with
pydantic on every read; it carries a SHA-256 of its own body so that a
bit-flip or a hand edit is caught, lists every data file with size and
SHA-256, and refuses file paths that could escape the snapshot's prefix.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runner.errors import ManifestError  # defined there, re-exported here

FORMAT = "runner.snapshot"
FORMAT_VERSION = 1
# Version 2: `layout` may be "sharded" (torch.distributed.checkpoint shards, see
# checkpoint/sharded/); a runner that knows only 1 says "upgrade" instead of misreading one.
SHARDED_FORMAT_VERSION = 2
SUPPORTED_VERSIONS = {1, 2}

_SAFE_PATH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")


class Reason(str, Enum):
    PERIODIC = "periodic"
    EMERGENCY = "emergency"
    FINAL = "final"
    MANUAL = "manual"
    SYNC = "sync"


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    component: str = ""

    @field_validator("path")
    @classmethod
    def _no_escape(cls, value: str) -> str:
        # A manifest comes from the bucket, which we do not trust: no "..",
        # no absolute paths, no backslashes, nothing but plain names.
        if not _SAFE_PATH.match(value) or ".." in value.split("/"):
            raise ValueError(f"file path {value!r} escapes its snapshot")
        return value


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    run_id: str
    snapshot_id: str
    step: int = Field(ge=0)
    epoch: int = Field(default=0, ge=0)
    reason: Reason
    created_at: dt.datetime
    parent: str | None = None
    forked_from: str | None = None
    world_size: int = Field(default=1, ge=1)
    layout: Literal["single", "sharded"] = "single"
    versions: dict[str, str] = Field(default_factory=dict)
    files: list[FileEntry]
    metrics: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    body_sha256: str = ""

    @property
    def final(self) -> bool:
        return self.reason is Reason.FINAL

    @property
    def sharded(self) -> bool:
        return self.layout == "sharded"

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, component: str) -> FileEntry | None:
        return next((f for f in self.files if f.component == component), None)

    def _dump(self, exclude: set[str]) -> dict[str, Any]:
        # A single-file snapshot's manifest stays exactly version 1 (no `layout`), so older runners read it.
        return self.model_dump(mode="json", exclude=exclude if self.sharded else exclude | {"layout"})

    def _body(self) -> dict[str, Any]:
        return self._dump({"body_sha256"})

    def sealed(self) -> "Manifest":
        """This manifest with `body_sha256` filled in."""
        return self.model_copy(update={"body_sha256": _digest(self._body())})

    def to_bytes(self) -> bytes:
        return json.dumps(self.sealed()._dump(set()), indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Manifest":
        """Parse and check a manifest. Raises ManifestError with one clear reason."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"not JSON ({exc.__class__.__name__})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ManifestError("not a runner snapshot manifest")
        if raw.get("format_version") not in SUPPORTED_VERSIONS:
            raise ManifestError(
                f"format_version {raw.get('format_version')!r} is not supported by this runner "
                f"(supports {sorted(SUPPORTED_VERSIONS)}); upgrade runner"
            )
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ManifestError(f"invalid field {where}: {first['msg']}") from None
        if manifest.body_sha256 != _digest(manifest._body()):
            raise ManifestError("its hash does not match its body (corrupt or edited)")
        return manifest


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
