"""One file in a --sync-dir: its stored name, whether it is whole, a consistent read of it, its training step.

Pure functions of bytes, names and a stat, used by the rest of syncdir/ (which decides
when to look).  Design notes (why):

- A torch checkpoint (`torch.save`'s zip format, `PK\\x03\\x04` first) is whole
  when its zip end record is in place (torch writes it last) AND the bytes
  read are one version: the central directory parses and every member's
  CRC-32 (torch writes them) matches.  The CRC check is what catches a read
  torn by an in-place rewrite (nanoGPT's `torch.save` to the same `ckpt.pt`):
  (size, mtime, inode) before and after the read is not enough on its own,
  because a rewrite keeps the inode and the size, and file times are coarse
  (a truncation was seen to keep the previous mtime on ext4).  A member
  whose CRC is 0 (torch with `compute_crc32` off) cannot be checked; then the
  stat comparison is all there is.
- The training step of a file, in this order: the user's rule
  (`--sync-step-from`: a KEY inside torch files, or a REGEX over the file's
  path with one group); the largest integer in the file name (`G_2333.pth`,
  `epoch=9-step=1000.ckpt`); a `checkpoint-N`-style folder (Hugging Face's
  `checkpoint-500/optimizer.pt`); an integer key inside the torch file
  (`iter_num`, `global_step`, `step`).  Name before key because some
  trainers' keys mean something else (GPT-SoVITS's `iteration` is the
  epoch, hence not a default key).
- Keys are read from the bytes already in memory for the upload, from the
  zip's `data.pkl` alone, by an allow-list unpickler in the spirit of
  `torch.load(weights_only=True)` but stricter: nothing the file names is
  imported or called (torch/numpy names become empty stand-ins, any other
  global refuses the file, which then just has no key step), and tensor
  data is never read, so a large checkpoint costs its pickle only.  Not
  torch.load itself: importing torch into the supervisor took 2-3 s on a
  busy machine, inside the scanner's lock, and held up the sync on a spot
  notice by as long (seen in the nanoGPT-style test); and torch.load would
  rebuild every tensor.
"""

from __future__ import annotations

import base64
import binascii
import collections
import io
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

Fingerprint = tuple[int, int, int]  # size, mtime_ns, inode

MAX_STEP = 10**12 - 1
ENCODED_PREFIX = "_b32."
PRIVATE_PREFIX = ".runner-"  # our staging files in DIR; never synced
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_BASE32 = re.compile(r"^[a-z2-7]+$")
DEFAULT_KEYS = ("iter_num", "global_step", "step")
_ZIP_HEAD = b"PK\x03\x04"
_ZIP_END = b"PK\x05\x06"
_ZIP_TAIL = 22 + 65535  # the end record plus the longest comment
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_FOLDER_STEP = re.compile(r"^(?:checkpoint|ckpt|step|global_step|iter)[-_=]?(\d+)$", re.I)


def fingerprint(st: os.stat_result) -> Fingerprint:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


# -- how names are stored (the notes in syncdir/__init__.py) ---------------------------------------------

def encode_path(rel: str) -> str:
    """The manifest path for DIR-relative `rel` ("a/b c.pth" -> "a/_b32.mjqgg..."); see the module notes."""
    return "/".join(_encode_segment(s) for s in rel.split("/"))


def _encode_segment(name: str) -> str:
    if _SAFE_SEGMENT.match(name) and not name.startswith(ENCODED_PREFIX):
        return name
    return ENCODED_PREFIX + base64.b32encode(os.fsencode(name)).decode().rstrip("=").lower()


def decode_path(path: str) -> str:
    """The DIR-relative path a manifest path stands for. Raises ValueError for one that is not ours or unsafe."""
    return "/".join(_decode_segment(s) for s in path.split("/"))


def _decode_segment(segment: str) -> str:
    if not segment.startswith(ENCODED_PREFIX):
        name = segment
    else:
        body = segment[len(ENCODED_PREFIX):]
        if not _BASE32.match(body):
            raise ValueError(f"{segment!r} is not a valid encoded name")
        try:
            name = os.fsdecode(base64.b32decode(body.upper() + "=" * (-len(body) % 8)))
        except (ValueError, TypeError):
            raise ValueError(f"{segment!r} is not a valid encoded name") from None
    if name in ("", ".", "..") or "/" in name or "\0" in name or (os.sep != "/" and os.sep in name):
        raise ValueError(f"{segment!r} names an unsafe path segment")
    return name


# -- completeness -------------------------------------------------------------------------


def is_zip(data: bytes) -> bool:
    return data.startswith(_ZIP_HEAD)


def zip_complete(data: bytes) -> bool:
    """False for the prefix of a zip file (torch.save's format) whose end record is not written yet; True otherwise."""
    if not is_zip(data):
        return True
    return zip_end_ok(data[-_ZIP_TAIL:])


def zip_end_ok(tail: bytes) -> bool:
    """The bytes end with a zip end record whose comment length fits exactly."""
    at = tail.rfind(_ZIP_END)
    while at >= 0:
        if at + 22 <= len(tail) and at + 22 + int.from_bytes(tail[at + 20:at + 22], "little") == len(tail):
            return True
        at = tail.rfind(_ZIP_END, 0, at)
    return False


def zip_whole(data: bytes) -> bool:
    """True when `data` is one whole version of a zip: end record, central directory and every member's CRC-32.

    Bytes that are not a zip are True (nothing to check).  A torn read (the
    start of one version, the end of another) fails a CRC or the directory.
    """
    if not is_zip(data):
        return True
    if not zip_complete(data):
        return False
    view = memoryview(data)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if not _member_ok(archive, info, view):
                    return False
    # zipfile raises NotImplementedError for a compression method it cannot read: not provably whole either.
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError):
        return False
    return True


def _member_ok(archive: zipfile.ZipFile, info: zipfile.ZipInfo, view: memoryview) -> bool:
    head = bytes(view[info.header_offset:info.header_offset + 30])
    if len(head) < 30 or not head.startswith(_ZIP_HEAD):
        return False
    start = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little")
    if start + info.compress_size > len(view):
        return False
    if info.CRC == 0 and info.file_size:
        return True  # written without checksums: cannot be checked
    if info.compress_type == zipfile.ZIP_STORED:  # torch's members: check in place, no copy
        return binascii.crc32(view[start:start + info.compress_size]) == info.CRC
    with archive.open(info) as member:  # another writer's compressed member: zipfile checks the CRC at the end
        while member.read(1 << 20):
            pass
    return True


def tail_state(path: Path) -> str:
    """"complete" (a zip with its end record), "partial" (a zip without) or "other" (not a zip), read cheaply."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_ZIP_HEAD)) != _ZIP_HEAD:
                return "other"
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - _ZIP_TAIL))
            return "complete" if zip_end_ok(f.read()) else "partial"
    except OSError:
        return "partial"  # vanished or unreadable: look again later


@dataclass(frozen=True)
class Read:
    """One consistent read of a file: its bytes, their SHA-256 and the state they were read in."""

    data: bytes
    sha256: str
    fingerprint: Fingerprint


def read_consistent(path: Path, expected: Fingerprint | None = None) -> tuple[bytes, Fingerprint] | None:
    """The file's bytes when its (size, mtime, inode) are the same before and after the read (and equal
    `expected` when given); None when it changed, vanished or cannot be read now."""
    try:
        before = fingerprint(os.lstat(path))
        if expected is not None and before != expected:
            return None
        with open(path, "rb") as f:
            data = f.read()
        after = fingerprint(os.lstat(path))
    except OSError:
        return None
    if after != before or len(data) != before[0]:
        return None
    return data, after


# -- the training step of a file ---------------------------------------------------------------


@dataclass(frozen=True)
class StepRule:
    """`--sync-step-from`: a key inside torch files, or a regex over paths with one group."""

    key: str | None = None
    regex: re.Pattern[str] | None = None


def parse_step_rule(text: str) -> StepRule:
    """`iter_num`, `trainer.global_step` -> a key; anything else must be a regex with one (group).

    Raises ValueError with what to write instead.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty: give a key inside the checkpoint (e.g. iter_num) or a regex with one group "
                         r"(e.g. 'ckpt_(\d+)\.pt')")
    if _KEY.match(text):
        return StepRule(key=text)
    try:
        regex = re.compile(text)
    except re.error as exc:
        raise ValueError(f"{text!r} is not a key (letters, digits, _ and dots) nor a valid regex: {exc}") from None
    if regex.groups != 1 and "step" not in regex.groupindex:
        raise ValueError(f"the regex {text!r} needs exactly one (group) around the step, or a (?P<step>...) group")
    return StepRule(regex=regex)


def step_from_name(rel: str) -> int | None:
    """The largest integer (< 10**12) in the file name of `rel`, or None."""
    numbers = [int(n) for n in re.findall(r"\d+", rel.rsplit("/", 1)[-1]) if len(n.lstrip("0")) <= 12]
    return max(numbers) if numbers else None


def step_from_folder(rel: str) -> int | None:
    """N of the innermost `checkpoint-N` / `step_N` / `global_step=N` folder `rel` is in, or None."""
    for segment in reversed(rel.split("/")[:-1]):
        match = _FOLDER_STEP.match(segment)
        if match and len(match.group(1).lstrip("0")) <= 12:
            return int(match.group(1))
    return None


def step_from_regex(rule: StepRule, rel: str) -> int | None:
    assert rule.regex is not None
    match = rule.regex.search(rel)
    if match is None:
        return None
    text = match.group("step") if "step" in rule.regex.groupindex else match.group(1)
    return int(text) if text is not None and text.isdigit() and int(text) <= MAX_STEP else None


def needs_keys(rel: str, rule: StepRule | None) -> bool:
    """Whether the step of `rel` may come from inside it (so its contents are worth loading)."""
    if rule is not None and rule.key is not None:
        return True
    return step_from_name(rel) is None and step_from_folder(rel) is None


def keys_in(data: bytes, keys: tuple[str, ...]) -> dict[str, int]:
    """The integer values of `keys` (dotted = nested dicts) in a torch file; {} for anything else."""
    obj = _load_pickle(data)
    found = {}
    for key in keys:
        value = _lookup(obj, key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP:
            found[key] = value
    return found


def _load_pickle(data: bytes) -> object:
    """The object a torch zip's `data.pkl` holds, with every tensor, storage and torch/numpy object an opaque
    stand-in (module notes); None when it is not a torch zip or names anything else."""
    if not is_zip(data):
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(names) != 1:
                return None
            return _StepUnpickler(io.BytesIO(archive.read(names[0]))).load()
    except Exception:  # not a torch file, or one we will not unpickle: no step from it, by design
        return None


class _Opaque:
    """Stands in for whatever a torch checkpoint's pickle rebuilds (tensors, storages, dtypes): holds nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> "_Opaque":
        return _Opaque()

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass


class _StepUnpickler(pickle.Unpickler):
    """An allow-list unpickler like `torch.load(weights_only=True)`'s, stricter: nothing named in the file is
    ever called or imported; torch and numpy names become stand-ins, any other global refuses the file."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module.split(".", 1)[0] in ("torch", "numpy"):
            return _Opaque
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")

    def persistent_load(self, pid: object) -> object:
        return _Opaque()  # a storage: its bytes are never read


def _lookup(obj: object, key: str) -> object:
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def key_list(rule: StepRule | None) -> tuple[str, ...]:
    return ((rule.key,) if rule is not None and rule.key else ()) + DEFAULT_KEYS


def file_step(rel: str, keys: dict[str, int], rule: StepRule | None, checkpoint: bool) -> tuple[int, int] | None:
    """(rank, step) of one file (module notes), or None.  Rank 1: from the user's rule; 0: found on our own,
    which only checkpoint files are asked for (a TensorBoard event file's name holds a timestamp)."""
    if rule is not None:
        step = step_from_regex(rule, rel) if rule.regex is not None else keys.get(rule.key or "")
        if step is not None:
            return 1, step
    if not checkpoint:
        return None
    for step in (step_from_name(rel), step_from_folder(rel)):
        if step is not None:
            return 0, step
    step = next((keys[k] for k in DEFAULT_KEYS if k in keys), None)
    return None if step is None else (0, step)
