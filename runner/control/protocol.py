"""What the supervisor and the training process share: env names and the control protocol.

`checkpoint/` and `supervisor/` never import each other; both import this
(re-exported by `runner/control/__init__.py`).

The supervisor starts the child with:
    RUNNER_BUCKET, RUNNER_RUN_ID, RUNNER_SAVE_EVERY_STEPS, RUNNER_KEEP_LAST,
    RUNNER_STORAGE_OPTIONS (JSON object), RUNNER_RESUME (snapshot id, "latest"
    or "none"), RUNNER_CONTROL_DIR (a local folder for requests and acks).
RUNNER_SAVE_EVERY_STEPS is a number of steps or "auto" (parse_save_every_steps).
With "auto" it may add RUNNER_INTERRUPTION_MTBF (seconds between
interruptions, the user's --interruption-mtbf) and
RUNNER_OBSERVED_INTERRUPTIONS ({"interruptions", "exposure_s"}: what the
run's cost ledger shows, counted by the supervisor, which reads the ledger;
the child's runner.checkpoint.interval turns it into an MTBF).

Requests reach the child two ways, so that either alone suffices:
- a signal: SIGUSR1 = save now and stop; SIGUSR2 = save now and go on
  (for a rebalance recommendation).  Sent to the child's process group, it
  reaches every torchrun worker.  A user can send it by hand: `kill -USR1 PID`.
- a file `<control dir>/request.json` ({"id", "action"}), written atomically,
  which the child polls at step boundaries; it works where signals are
  swallowed by a wrapper script.

The child answers with `<control dir>/ack-<id>.json` ({"id", "snapshot_id",
"step"}), written atomically after the snapshot is committed.  Requests made
by signal are answered under the id "signal".

In a torchrun job spanning several machines, a notice reaches the ranks of
one machine only; they carry it to all ranks at the next step boundary, and
every rank saves the same step and stops.  The ranks whose supervisor asked
for nothing write `<control dir>/peer-stopped.json` ({"snapshot_id", "step"})
instead of an ack, so that their supervisor knows the job stopped for a
peer machine's notice, with a committed snapshot, and not because it finished.

The child also reports the step it reached in `<control dir>/progress.json`
({"step", "time"}), at most every 0.2 s, so that the supervisor can
say how much work a preemption without an emergency snapshot loses, and
appends one line per committed snapshot to `<control dir>/commits.jsonl`
({"snapshot_id", "step", "reason", "time", "stall_s", "write_s"}) for the
cost ledger (training stall and upload time are known only in the child).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ENV_BUCKET = "RUNNER_BUCKET"
ENV_RUN_ID = "RUNNER_RUN_ID"
ENV_SAVE_EVERY_STEPS = "RUNNER_SAVE_EVERY_STEPS"
ENV_KEEP_LAST = "RUNNER_KEEP_LAST"
ENV_STORAGE_OPTIONS = "RUNNER_STORAGE_OPTIONS"
ENV_RESUME = "RUNNER_RESUME"
ENV_CONTROL_DIR = "RUNNER_CONTROL_DIR"
ENV_INTERRUPTION_MTBF = "RUNNER_INTERRUPTION_MTBF"
ENV_OBSERVED_INTERRUPTIONS = "RUNNER_OBSERVED_INTERRUPTIONS"

AUTO = "auto"  # save_every_steps chosen from measured costs (runner.checkpoint.interval)

STOP_SIGNAL = signal.SIGUSR1
SAVE_SIGNAL = signal.SIGUSR2

STOP = "stop"  # save now, then stop training (termination notice)
SAVE = "save"  # save now, keep training (rebalance recommendation)
SIGNAL_REQUEST_ID = "signal"

_REQUEST_FILE = "request.json"
_PROGRESS_FILE = "progress.json"
_COMMITS_FILE = "commits.jsonl"
_PEER_STOPPED_FILE = "peer-stopped.json"
_PROGRESS_EVERY_S = 0.2


@dataclass(frozen=True)
class Request:
    id: str
    action: str  # STOP or SAVE


def parse_save_every_steps(value: object) -> int | str:
    """A save interval as the flag, the env and the keyword take it: an int >= 1 or "auto".

    Raises ValueError with what to write instead.
    """
    text = str(value).strip().lower() if isinstance(value, str) else value
    if text == AUTO:
        return AUTO
    try:
        steps = int(text) if isinstance(text, str) else text
    except ValueError:
        steps = None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"use a number of steps (1 or more) or 'auto', not {value!r}")
    return steps


def encode_interruptions(interruptions: int, exposure_s: float) -> str:
    """RUNNER_OBSERVED_INTERRUPTIONS: interruptions seen over `exposure_s` seconds of the run."""
    return json.dumps({"interruptions": int(interruptions), "exposure_s": round(float(exposure_s), 3)})


def decode_interruptions(text: str) -> tuple[int, float] | None:
    """(interruptions, exposure seconds) from RUNNER_OBSERVED_INTERRUPTIONS; None when malformed."""
    try:
        raw = json.loads(text)
        count, exposure = int(raw["interruptions"]), float(raw["exposure_s"])
    except (ValueError, KeyError, TypeError):
        return None
    return (count, exposure) if count >= 0 and exposure >= 0 else None


def _write_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


# -- the child's side ------------------------------------------------------

_stop = threading.Event()
_save = threading.Event()
_installed = False


def preemption_requested() -> bool:
    """True once a stop was requested (signal or control file): save and stop soon."""
    return _stop.is_set()


def install_signal_handlers() -> bool:
    """Route SIGUSR1/SIGUSR2 to the request flags. Only possible from the main thread."""
    global _installed
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(STOP_SIGNAL, lambda *_: _stop.set())
    signal.signal(SAVE_SIGNAL, lambda *_: _save.set())
    _installed = True
    return True


class ChildChannel:
    """Polls for requests and writes acknowledgements (the training process's end)."""

    def __init__(self, control_dir: str | None, poll_interval_s: float = 0.2):
        self.dir = Path(control_dir) if control_dir else None
        self.poll_interval_s = poll_interval_s
        self._last_poll = 0.0
        self._last_progress = 0.0
        self._answered: set[str] = set()
        self._stopped = False  # a stop was answered: later polls ask for nothing more

    def poll(self) -> Request | None:
        """The pending request, if any: cheap enough to call every step."""
        if self._stopped:
            return None
        if _stop.is_set():
            return Request(SIGNAL_REQUEST_ID, STOP)
        if _save.is_set():
            _save.clear()
            return Request(SIGNAL_REQUEST_ID, SAVE)
        return self._poll_file()

    def _poll_file(self) -> Request | None:
        if self.dir is None:
            return None
        now = time.monotonic()
        if now - self._last_poll < self.poll_interval_s:
            return None
        self._last_poll = now
        try:
            raw = json.loads((self.dir / _REQUEST_FILE).read_text())
            request = Request(str(raw["id"]), str(raw["action"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if request.id in self._answered or request.action not in (STOP, SAVE):
            return None
        if request.action == STOP:
            _stop.set()
        return request

    def progress(self, step: int) -> None:
        """Report the step reached; cheap enough to call every step (writes at most every 0.2 s)."""
        if self.dir is None:
            return
        now = time.monotonic()
        if now - self._last_progress < _PROGRESS_EVERY_S:
            return
        self._last_progress = now
        try:
            _write_atomic(self.dir / _PROGRESS_FILE, {"step": step, "time": time.time()})
        except OSError:
            pass

    def committed(self, snapshot_id: str, step: int, reason: str, stall_s: float, write_s: float) -> None:
        """Report a committed snapshot (one appended line; best effort, never raises)."""
        if self.dir is None:
            return
        line = json.dumps({"snapshot_id": snapshot_id, "step": step, "reason": reason, "time": time.time(),
                           "stall_s": round(stall_s, 6), "write_s": round(write_s, 6)}) + "\n"
        try:
            with open(self.dir / _COMMITS_FILE, "a") as f:  # one short write: appends do not interleave
                f.write(line)
        except OSError:
            pass

    def ack(self, request: Request, snapshot_id: str, step: int) -> None:
        """Answer a request. Best effort: the snapshot is committed whether or not the answer lands."""
        self._answered.add(request.id)
        self._stopped = self._stopped or request.action == STOP
        if self.dir is None:
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.dir / f"ack-{request.id}.json",
                          {"id": request.id, "snapshot_id": snapshot_id, "step": step})
        except OSError as exc:
            logging.getLogger("runner.control").warning("could not acknowledge request %s: %s", request.id, exc)


    def peer_stopped(self, snapshot_id: str, step: int) -> None:
        """Say that the job stopped for another machine's notice after committing `snapshot_id` (best effort)."""
        self._stopped = True
        if self.dir is None:
            return
        try:
            _write_atomic(self.dir / _PEER_STOPPED_FILE, {"snapshot_id": snapshot_id, "step": step})
        except OSError as exc:
            logging.getLogger("runner.control").warning("could not report the stop for a peer: %s", exc)


def reset_for_tests() -> None:
    """Clear the process-wide request flags (tests that run several loops in one process)."""
    _stop.clear()
    _save.clear()


# -- the supervisor's side -------------------------------------------------


class SupervisorChannel:
    """Writes requests and waits for acknowledgements (the supervisor's end)."""

    def __init__(self, control_dir: str):
        self.dir = Path(control_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def request(self, action: str) -> str:
        request_id = uuid.uuid4().hex[:12]
        # An earlier answer to a signal must not pass for the answer to this request.
        (self.dir / f"ack-{SIGNAL_REQUEST_ID}.json").unlink(missing_ok=True)
        _write_atomic(self.dir / _REQUEST_FILE, {"id": request_id, "action": action})
        return request_id

    def progress(self) -> int | None:
        """The step the child last reported, or None."""
        try:
            return int(json.loads((self.dir / _PROGRESS_FILE).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def commits(self, offset: int = 0) -> tuple[list[dict], int]:
        """Snapshots the child reported committed after byte `offset`, and the offset to pass next time."""
        try:
            with open(self.dir / _COMMITS_FILE, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError:
            return [], offset
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next call
        out = []
        for line in complete.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out, offset + len(complete)

    def peer_stopped(self) -> dict | None:
        """What the child said when the job stopped for another machine's notice, or None."""
        try:
            return json.loads((self.dir / _PEER_STOPPED_FILE).read_text())
        except (OSError, ValueError):
            return None

    def ack(self, request_id: str) -> dict | None:
        for rid in (request_id, SIGNAL_REQUEST_ID):
            try:
                return json.loads((self.dir / f"ack-{rid}.json").read_text())
            except (OSError, ValueError):
                continue
        return None
