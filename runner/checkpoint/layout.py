"""Where a run's objects live in the bucket (the key layout).

    <run>/manifests/<snapshot id>.json     written last, exclusively; a snapshot
                                           without one does not exist
    <run>/data/<snapshot id>/<file>        the snapshot's data, immutable
    <run>/pins/<snapshot id>               an empty marker: keep this snapshot

A snapshot id is `<step, 12 digits>-<UTC time to the microsecond>-<random>`:
fresh for every attempt (two writers never share a prefix), and sorting ids
sorts snapshots by step, then by time, so that a final save made right after
a periodic one at the same step sorts after it.  (Ids from before the
microseconds were added, `...T<HHMMSS>-...`, are still read.)
"""

from __future__ import annotations

import datetime as dt
import re
import secrets

MANIFESTS = "manifests"
DATA = "data"
PINS = "pins"

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SNAPSHOT_ID = re.compile(r"^\d{12}-\d{8}T\d{6}(\d{6})?-[0-9a-f]{6}$")


def check_run_id(run_id: str) -> str:
    """`run_id` if usable as a key prefix; ValueError (pydantic's validator contract) otherwise."""
    if not valid_run_id(run_id):
        raise ValueError("use letters, digits, '.', '_' and '-' (at most 128), starting with a letter or digit")
    return run_id


def valid_run_id(run_id: str) -> bool:
    return bool(_RUN_ID.match(run_id)) and ".." not in run_id


def valid_snapshot_id(snapshot_id: str) -> bool:
    return bool(_SNAPSHOT_ID.match(snapshot_id))


def new_snapshot_id(step: int, now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{step:012d}-{now:%Y%m%dT%H%M%S%f}-{secrets.token_hex(3)}"


def step_of(snapshot_id: str) -> int:
    return int(snapshot_id.split("-", 1)[0])


def manifests_prefix(run_id: str) -> str:
    return f"{run_id}/{MANIFESTS}/"


def manifest_key(run_id: str, snapshot_id: str) -> str:
    return f"{run_id}/{MANIFESTS}/{snapshot_id}.json"


def data_prefix(run_id: str, snapshot_id: str = "") -> str:
    return f"{run_id}/{DATA}/{snapshot_id}/" if snapshot_id else f"{run_id}/{DATA}/"


def data_key(run_id: str, snapshot_id: str, file: str) -> str:
    return f"{run_id}/{DATA}/{snapshot_id}/{file}"


def pins_prefix(run_id: str) -> str:
    return f"{run_id}/{PINS}/"


def pin_key(run_id: str, snapshot_id: str) -> str:
    return f"{run_id}/{PINS}/{snapshot_id}"


def snapshot_id_from_manifest_key(key: str) -> str | None:
    """The snapshot id a manifest key names, or None for a foreign object."""
    name = key.rsplit("/", 1)[-1]
    if not name.endswith(".json"):
        return None
    sid = name[: -len(".json")]
    return sid if valid_snapshot_id(sid) else None


def snapshot_id_from_data_key(run_id: str, key: str) -> str | None:
    rest = key[len(data_prefix(run_id)):] if key.startswith(data_prefix(run_id)) else ""
    sid = rest.split("/", 1)[0]
    return sid if valid_snapshot_id(sid) else None
