"""The kill campaign: randomized SIGKILLs of real `runner start` runs through a failing S3, and what must survive them.

Owns: running trials, checking each one, bucket hygiene after each run, and
the summary table.  Not a CI test (tests/test_chaos.py runs a small subset).

A *run* is one training job (benchmarks/chaos_train.py under
`python -m runner start`, one process or a 2-rank torchrun job) in a bucket of
its own on moto, reached through a loopback FlakyProxy (tests/flaky_proxy.py)
that fails a seeded share of requests.  Each *trial* is one start of that run
killed with SIGKILL, the supervisor and all its children at once, as a
reclaimed instance dies, at a moment drawn from:
  - fault:<phase>  the writer's own fault point (RUNNER_FAULT_KILL_AT) in the
                   n-th save of the process; the rest of the tree is killed as
                   soon as the training process is seen dead;
  - hold:<kind>    the n-th request of a kind (data upload, multipart part,
                   CompleteMultipartUpload, manifest create, retention delete,
                   lease write, ledger write) is held in the proxy, the tree
                   is killed, then the request is dropped or applied (half each:
                   a dead client's request may still reach S3);
  - timed          a uniform moment after the first training step.
After the kills the run is started once more and trains to the end.

Checked after every trial, at the next start: the snapshot it restored
deep-verifies (every byte against its SHA-256, by the training process), it is
the newest manifest in the bucket, every rank restored the same one, and no
committed snapshot that retention must keep (the newest keep-last of all ever
reported committed or seen) has disappeared.  At the end of a run: the final
state (parameters, optimizer, RNG streams, per rank) is bitwise equal to the
uninterrupted run's; `runner verify --json` is clean; after `runner gc
--orphan-age 0` no data without a manifest and no multipart upload is left;
every ledger record parses.

    python benchmarks/chaos.py --seed 1 --trials 1000 --fault-rate 0.05 --jobs 2 --work DIR

SIGTERM or ^C stops it after the runs in flight, with the table of what ran.
Started again with the same arguments and `--work DIR`, it reads back the
runs already checked (each run's `tally.json`) and runs the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the proxy lives with the tests that use it

from benchmarks._moto import MotoS3  # noqa: E402
from flaky_proxy import FaultPlan, FlakyProxy  # noqa: E402

PYTHON = sys.executable
TRAIN = str(ROOT / "benchmarks" / "chaos_train.py")
PHASES = ("before-data", "mid-data", "before-manifest", "after-manifest")
HOLD_KINDS = ("data", "part", "complete", "manifest", "retention", "lease", "ledger")
FAULT_SHARES = {"503": 0.25, "500": 0.2, "reset": 0.2, "lost-reply": 0.2, "stall": 0.05, "complete-fail": 0.1}
KEEP_LAST = 3
SAVE_EVERY = 2
LEASE_TTL = 3  # the least runner allows: a start after a kill waits at most this for the dead lease
SEGMENT_TIMEOUT = 120.0  # one start; a hung start is a failure, not a wait
READ_TIMEOUT = 2  # the client's S3 read timeout, so that a stalled reply costs seconds


@dataclass
class RunPlan:
    """Everything a run does, drawn from the campaign's seed: replaying a seed replays the plan."""

    index: int
    ranks: int
    blob_mb: float
    steps: int
    kills: list[str]  # one kill mode per trial
    kill_args: list[dict]
    fault_seed: int


@dataclass
class Tally:
    trials: int = 0
    runs: int = 0
    finished_runs: int = 0
    kills: Counter = field(default_factory=Counter)
    kills_missed: Counter = field(default_factory=Counter)  # the kill moment never came: the start finished
    dropped: int = 0  # planned kills of a run that had already finished
    not_started: int = 0  # planned kills of runs the time limit left out
    faults: Counter = field(default_factory=Counter)
    requests: int = 0
    invalid_chosen: int = 0
    not_newest: int = 0
    committed_lost: int = 0
    never_committed: Counter = field(default_factory=Counter)  # a save in flight at the kill, per kill mode
    bitwise_mismatch: int = 0
    hygiene_failures: int = 0
    finished_at_kill: int = 0  # the kill came after the final manifest: the next start found the run finished
    supervisor_misread: int = 0  # a supervisor that saw committed manifests as vanished, or no final snapshot
    redone: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    @classmethod
    def from_json(cls, raw: dict) -> "Tally":
        counters = {k: Counter(raw[k]) for k in ("kills", "kills_missed", "faults", "never_committed")}
        return cls(**{**raw, **counters})

    def merge(self, other: "Tally") -> None:
        """Add one run's tally to the campaign's."""
        with self.lock:
            for name, value in other.to_json().items():
                if name != "seconds":
                    setattr(self, name, getattr(self, name) + value)


# -- planning -------------------------------------------------------------------------------


def plan_runs(seed: int, trials: int, two_rank_share: float, big_share: float) -> list[RunPlan]:
    """Split `trials` into runs of 2-5 kills each, every draw from `seed`."""
    rng = random.Random(seed)
    runs: list[RunPlan] = []
    left = trials
    while left > 0:
        n = min(left, rng.randint(2, 5))
        left -= n
        ranks = 2 if rng.random() < two_rank_share else 1
        blob = 33.0 if ranks == 1 and rng.random() < big_share else 0.0  # > 2 x 16 MiB parts: multipart
        kills, args = [], []
        for _ in range(n):
            mode, arg = draw_kill(rng, big=blob > 0)
            kills.append(mode)
            args.append(arg)
        runs.append(RunPlan(len(runs), ranks, blob, 13, kills, args, rng.randrange(2**31)))
    return runs


def draw_kill(rng: random.Random, big: bool) -> tuple[str, dict]:
    """Weighted towards a save in flight: 45 % at a writer phase, 40 % on a held request, 15 % anywhere."""
    x = rng.random()
    if x < 0.45:
        return f"fault:{rng.choice(PHASES)}", {"save": rng.randint(1, 4)}
    if x < 0.85:
        kinds = HOLD_KINDS if big else tuple(k for k in HOLD_KINDS if k not in ("part", "complete"))
        kind = rng.choice(kinds)
        nth = rng.randint(2, 4) if kind == "lease" else rng.randint(1, 3)  # lease 1 is the acquire; later ones renew
        return f"hold:{kind}", {"nth": nth, "apply": rng.random() < 0.5}
    return "timed", {"after": rng.uniform(0.0, 1.5)}


def request_kind(method: str, path: str) -> str | None:
    """Which HOLD_KINDS a proxied request is (None: something else, e.g. a read)."""
    query = path.partition("?")[2]
    if method == "POST" and "uploadId=" in query:
        return "complete"
    if method == "PUT" and "partNumber=" in query:
        return "part"
    if (method == "POST" and "delete" in query) or method == "DELETE":
        return "retention" if "/lease/" not in path else None
    if method != "PUT":
        return None
    for marker, kind in (("/data/", "data"), ("/manifests/", "manifest"), ("/lease/", "lease"),
                         ("/ledger/", "ledger")):
        if marker in path:
            return kind
    return None


# -- processes ------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo and len(out) < 10_000:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the supervisor and everything under it at once: stop all first, so nothing reacts or respawns."""
    tree = descendants(proc.pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything forked between the listing and the stop
    except ProcessLookupError:
        pass


def dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def events(log: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


# -- one run --------------------------------------------------------------------------------


class Run:
    """One training job: its bucket, proxy, starts and kills, and the checks between them."""

    def __init__(self, plan: RunPlan, s3: MotoS3, work: Path, fault_rate: float, tally: Tally,
                 references: dict, reference_lock: threading.Lock):
        self.plan, self.s3, self.tally = plan, s3, tally
        self.work = work / _run_folder(plan)
        self.work.mkdir(parents=True)
        self.log = self.work / "events.jsonl"
        self.bucket_name = s3.new_bucket(f"chaos{plan.index}")
        self.bucket = f"s3://{self.bucket_name}/runs"
        self.run_id = f"r{plan.index}"
        rates = {k: v * fault_rate for k, v in FAULT_SHARES.items()}
        self.armed: dict | None = None
        self.current: subprocess.Popen | None = None
        self.proxy = FlakyProxy(s3.endpoint, faults=FaultPlan(rates, seed=plan.fault_seed), hold=self._hold,
                                stall_seconds=READ_TIMEOUT + 1.0)
        self.proxy.server.handle_error = lambda request, address: None  # a dropped held request is no error
        self.committed: set[str] = set()  # every snapshot ever reported committed or seen in the bucket
        self.references, self.reference_lock = references, reference_lock

    # The proxy calls this before forwarding each request (in its handler thread).
    def _hold(self, method: str, path: str) -> None:
        armed = self.armed
        # A bulk delete (retention) is `POST /<bucket>?delete`: the bucket is followed by "?", not "/".
        ours = path.startswith((f"/{self.bucket_name}/", f"/{self.bucket_name}?"))
        if armed is None or not ours or request_kind(method, path) != armed["kind"]:
            return
        with self.tally.lock:
            armed["seen"] += 1
            fire = armed["seen"] == armed["nth"] and not armed["fired"]
            if fire:
                armed["fired"] = True
        if not fire:
            return
        if self.current is not None:
            kill_tree(self.current)
        armed["killed"].set()
        if not armed["apply"]:
            raise ConnectionAbortedError("held request dropped with its dead client")

    def env(self, kill: str | None, arg: dict) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
        env.update(AWS_ENDPOINT_URL=self.proxy.url, PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
                   CHAOS_LOG=str(self.log), CHAOS_STEPS=str(self.plan.steps), CHAOS_STEP_SLEEP="0.05",
                   CHAOS_BLOB_MB=str(self.plan.blob_mb), OMP_NUM_THREADS="1")
        if kill and kill.startswith("fault:"):
            env["RUNNER_FAULT_KILL_AT"] = f"{kill.split(':', 1)[1]}:{arg['save']}"
        return env

    def command(self) -> list[str]:
        cmd = [PYTHON, "-m", "runner", "start", "--bucket", self.bucket, "--run-id", self.run_id,
               "--save-every-steps", str(SAVE_EVERY), "--keep-last", str(KEEP_LAST), "--notice-source", "none",
               "--max-restarts", "0", "--lease-ttl", str(LEASE_TTL), "--offline-prices", "--heartbeat", "1",
               "--storage-option", f"config_kwargs.read_timeout={READ_TIMEOUT}"]
        if self.plan.ranks > 1:
            cmd += ["--nproc-per-node", str(self.plan.ranks)]
        return cmd + ["--", PYTHON, TRAIN]

    def start(self, name: str, kill: str | None, arg: dict) -> tuple[subprocess.Popen, object]:
        out = open(self.work / f"{name}.log", "w")
        proc = subprocess.Popen(self.command(), env=self.env(kill, arg), cwd=self.work, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.current = proc
        return proc, out

    def segment(self, trial: int) -> bool:
        """One killed start; True when it was killed (False: it finished before the kill came)."""
        kill, arg = self.plan.kills[trial], self.plan.kill_args[trial]
        before = len(events(self.log))
        if kill.startswith("hold:"):
            self.armed = {"kind": kill.split(":", 1)[1], "nth": arg["nth"], "apply": arg["apply"], "seen": 0,
                          "fired": False, "killed": threading.Event()}
        proc, out = self.start(f"trial{trial}", kill, arg)
        try:
            killed = self._wait_kill(proc, kill, arg, before)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
            proc.wait(30)
            out.close()
            self.armed = None
            time.sleep(0.2)  # a held request let through reaches moto before the bucket is read
        return killed

    def _wait_kill(self, proc: subprocess.Popen, kill: str, arg: dict, before: int) -> bool:
        deadline = time.monotonic() + SEGMENT_TIMEOUT
        first_step_at = None
        while time.monotonic() < deadline:
            new = events(self.log)[before:]
            if proc.poll() is not None:
                return self.armed is not None and self.armed["killed"].is_set()
            if self.armed is not None and self.armed["killed"].is_set():
                return True
            if kill.startswith("fault:"):
                pids = [e["pid"] for e in new if e["event"] == "restored"]
                if pids and any(dead(p) for p in pids):
                    kill_tree(proc)
                    return True
            elif kill == "timed":
                if first_step_at is None and any(e["event"] == "step" for e in new):
                    first_step_at = time.monotonic()
                if first_step_at is not None and time.monotonic() - first_step_at >= arg["after"]:
                    kill_tree(proc)
                    return True
            time.sleep(0.005)
        kill_tree(proc)
        self.tally.problem(f"run {self.plan.index}: a start ran past {SEGMENT_TIMEOUT:.0f} s ({kill})")
        return True

    # -- checks -------------------------------------------------------------------------

    def manifests(self) -> list[str]:
        """Snapshot ids with a manifest, oldest first, read from moto directly (no faults)."""
        client = self.s3.client()
        prefix = f"runs/{self.run_id}/manifests/"
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket_name, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return sorted(k[len(prefix):-5] for k in keys if k.endswith(".json"))

    def note_committed(self, since: int) -> None:
        self.committed.update(e["snapshot"] for e in events(self.log)[since:] if e["event"] == "committed")

    def check_kept(self, present: list[str], when: str) -> None:
        """No committed snapshot that retention must keep (newest KEEP_LAST of all committed) is gone."""
        self.committed.update(present)
        must = sorted(self.committed)[-KEEP_LAST:]
        lost = [sid for sid in must if sid not in present]
        if lost:
            with self.tally.lock:
                self.tally.committed_lost += len(lost)
            self.tally.problem(f"run {self.plan.index} {when}: committed snapshots gone: {lost}; present {present}")

    def execute(self) -> None:
        self.proxy.__enter__()
        try:
            self._execute()
        finally:
            self.proxy.__exit__()
            with self.tally.lock:
                self.tally.faults.update(self.proxy.counts)
                self.tally.requests += self.proxy.requests
                self.tally.runs += 1
            self._drop_bucket()

    def _execute(self) -> None:
        pending = None  # the last kill, checked at the next start that restores: (newest, trial, kill, events)
        for trial, kill in enumerate(self.plan.kills):
            since = len(events(self.log))
            killed = self.segment(trial)
            seg = events(self.log)[since:]
            if pending is not None and any(e["event"] == "restored" for e in seg):
                self.restore_verdict(seg, *pending)
            self.note_committed(since)
            with self.tally.lock:
                self.tally.trials += 1
                (self.tally.kills if killed else self.tally.kills_missed)[kill] += 1
            if any(e["event"] == "finished" for e in seg):
                with self.tally.lock:
                    self.tally.dropped += len(self.plan.kills) - trial - 1
                return self.finish_checks(seg)
            present = self.manifests()
            self.check_kept(present, f"after trial {trial}")
            pending = (present[-1] if present else None, trial, kill, seg)
        since = len(events(self.log))
        proc, out = self.start("final", None, {})
        try:
            proc.wait(SEGMENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            proc.wait(30)
        finally:
            out.close()
        final = events(self.log)[since:]
        done = already_finished(Path(out.name))
        if done is not None and not any(e["event"] == "restored" for e in final):
            # Killed after its final manifest: the run is finished, the start must say so and train nothing.
            final = [{"event": "restored", "rank": r, "step": self.plan.steps, "snapshot": done, "verify": None}
                     for r in range(self.plan.ranks)]
            self.already_finished = True
        if pending is not None:
            self.restore_verdict(final, *pending)
        self.note_committed(since)
        if proc.returncode != 0:
            self.tally.problem(f"run {self.plan.index}: final start exit {proc.returncode}; see {out.name}")
        self.check_supervisor(Path(out.name))
        self.finish_checks(final)

    def check_supervisor(self, log: Path) -> None:
        """The supervisor of the finishing start saw the final snapshot the child committed, and no manifest vanish."""
        text = log.read_text()
        wrong = [line for line in text.splitlines()
                 if "manifest vanished" in line or "without a final snapshot" in line]
        if wrong:
            with self.tally.lock:
                self.tally.supervisor_misread += 1
            self.tally.problem(f"run {self.plan.index}: the supervisor misread the bucket: {wrong[:2]}")

    def restore_verdict(self, seg: list[dict], newest: str | None, trial: int, kill: str,
                        killed_seg: list[dict]) -> None:
        """The start after a kill restored the newest manifest, every rank the same, deep-verified."""
        restored = [e for e in seg if e["event"] == "restored"][:self.plan.ranks]
        chosen = {e["snapshot"] for e in restored}
        verify = [e["verify"] for e in restored if e["verify"] is not None]
        with self.tally.lock:
            if verify or len(chosen) != 1:
                self.tally.invalid_chosen += 1
                self.tally.problems.append(f"run {self.plan.index} trial {trial}: chose {chosen}: {verify}")
            elif chosen != {newest}:
                self.tally.not_newest += 1
                self.tally.problems.append(
                    f"run {self.plan.index} trial {trial} ({kill}): restored {chosen}, newest manifest {newest}")
            steps = [e["step"] for e in killed_seg if e["event"] == "step"]
            if steps and restored:
                reached = max(steps)
                self.tally.redone.append(max(0, reached - restored[0]["step"]))
                newest_step = int(newest.split("-")[0]) if newest else 0
                if reached // SAVE_EVERY * SAVE_EVERY > newest_step:
                    self.tally.never_committed[kill] += 1  # a save was due or in flight, and no manifest came

    def finish_checks(self, final_events: list[dict]) -> None:
        if getattr(self, "already_finished", False):  # no process trained, so no fingerprint to compare
            with self.tally.lock:
                self.tally.finished_at_kill += 1
            self.check_kept(self.manifests(), "at the end")
            return self.hygiene()
        finished = sorted((e for e in final_events if e["event"] == "finished"), key=lambda e: e["rank"])
        if len(finished) != self.plan.ranks:
            self.tally.problem(f"run {self.plan.index}: {len(finished)} finished records for {self.plan.ranks} ranks")
            return
        with self.tally.lock:
            self.tally.finished_runs += 1
        got = [e["fingerprint"] for e in finished]
        want = self.reference()
        if got != want:
            with self.tally.lock:
                self.tally.bitwise_mismatch += 1
            self.tally.problem(f"run {self.plan.index}: final state differs from the uninterrupted run's")
        self.check_kept(self.manifests(), "at the end")
        self.hygiene()

    def reference(self) -> list[str]:
        """The uninterrupted run's final fingerprints (per rank), on a local folder, once per configuration."""
        key = (self.plan.ranks, self.plan.blob_mb, self.plan.steps)
        with self.reference_lock:
            if key not in self.references:
                self.references[key] = reference_run(self.work.parent, *key)
            return self.references[key]

    # -- hygiene ------------------------------------------------------------------------

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
        return subprocess.run([PYTHON, "-m", "runner", *args, "--bucket", self.bucket, "--run-id", self.run_id],
                              env=env, capture_output=True, text=True, timeout=120)

    def hygiene(self) -> None:
        """After gc: no orphaned data, no multipart upload, every ledger record parses, verify clean."""
        problems = []
        gc = self.cli("gc", "--orphan-age", "0", "--keep-last", str(KEEP_LAST), "--json")
        if gc.returncode != 0:
            problems.append(f"gc exit {gc.returncode}: {gc.stderr[-300:]}")
        verify = self.cli("verify", "--json")
        if verify.returncode != 0:
            problems.append(f"verify exit {verify.returncode}: {verify.stdout[-300:]} {verify.stderr[-300:]}")
        client = self.s3.client()
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket_name, Prefix="runs/"):
            keys += [o["Key"] for o in page.get("Contents", [])]
        committed = {k.rsplit("/", 1)[-1][:-5] for k in keys if "/manifests/" in k}
        orphans = sorted({k.split("/")[3] for k in keys if "/data/" in k} - committed)
        if orphans:
            problems.append(f"orphaned data after gc: {orphans}")
        uploads = client.list_multipart_uploads(Bucket=self.bucket_name).get("Uploads", [])
        if uploads:
            problems.append(f"{len(uploads)} incomplete multipart uploads after gc")
        for key in (k for k in keys if "/ledger/" in k):
            try:
                json.loads(client.get_object(Bucket=self.bucket_name, Key=key)["Body"].read())
            except ValueError as exc:
                problems.append(f"ledger record {key} does not parse: {exc}")
        if problems:
            with self.tally.lock:
                self.tally.hygiene_failures += 1
            self.tally.problem(f"run {self.plan.index} hygiene: {problems}")

    def _drop_bucket(self) -> None:
        """moto holds everything in memory: empty the bucket once its run is checked."""
        client = self.s3.client()
        for upload in client.list_multipart_uploads(Bucket=self.bucket_name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=self.bucket_name, Key=upload["Key"], UploadId=upload["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket_name):
            objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objs:
                client.delete_objects(Bucket=self.bucket_name, Delete={"Objects": objs})
        client.delete_bucket(Bucket=self.bucket_name)


def already_finished(log: Path) -> str | None:
    """The final snapshot id when a start found its run finished already (`is already finished (final snapshot ID`)."""
    marker = "is already finished (final snapshot "
    for line in log.read_text().splitlines():
        if marker in line:
            return line.split(marker, 1)[1].split()[0]
    return None


# -- the campaign ---------------------------------------------------------------------------


def reference_run(work: Path, ranks: int, blob_mb: float, steps: int) -> list[str]:
    """Fingerprints (per rank) of the run with no kill and no fault, on a local folder."""
    folder = Path(tempfile.mkdtemp(prefix=f"ref{ranks}-", dir=work))
    log = folder / "events.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", CHAOS_LOG=str(log),
               CHAOS_STEPS=str(steps), CHAOS_STEP_SLEEP="0", CHAOS_BLOB_MB=str(blob_mb), OMP_NUM_THREADS="1")
    cmd = [PYTHON, "-m", "runner", "start", "--bucket", str(folder / "bucket"), "--run-id", "ref",
           "--save-every-steps", str(SAVE_EVERY), "--keep-last", str(KEEP_LAST), "--notice-source", "none",
           "--offline-prices"]
    if ranks > 1:
        cmd += ["--nproc-per-node", str(ranks)]
    done = subprocess.run([*cmd, "--", PYTHON, TRAIN], env=env, cwd=folder, capture_output=True, text=True,
                          timeout=SEGMENT_TIMEOUT)
    finished = sorted((e for e in events(log) if e["event"] == "finished"), key=lambda e: e["rank"])
    if done.returncode != 0 or len(finished) != ranks:
        raise RuntimeError(f"the reference run failed (exit {done.returncode}):\n{done.stdout[-2000:]}")
    return [e["fingerprint"] for e in finished]


def _run_folder(plan: RunPlan) -> str:
    return f"run{plan.index:05d}"


def _read_back(work: Path, plan: RunPlan, tally: Tally) -> bool:
    """Add a run checked by an earlier start of this campaign to `tally`; False when it must run (again)."""
    folder = work / _run_folder(plan)
    saved = folder / "tally.json"
    if saved.exists():
        tally.merge(Tally.from_json(json.loads(saved.read_text())))
        return True
    shutil.rmtree(folder, ignore_errors=True)  # stopped mid-run: run it again from the start
    return False


def campaign(seed: int, trials: int, fault_rate: float, jobs: int, two_rank_share: float, big_share: float,
             work: Path, time_limit: float) -> Tally:
    """Run every planned run (`jobs` at a time); stops starting new runs after `time_limit` seconds or SIGTERM.

    Each run's tally is kept in its folder (`tally.json`), so a campaign
    stopped early goes on where it stopped when started again on the same
    `work` folder with the same arguments: checked runs are read back, not run.
    """
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    tally, references, ref_lock = Tally(), {}, threading.Lock()
    plans = plan_runs(seed, trials, two_rank_share, big_share)
    began = time.monotonic()
    todo = list(reversed([p for p in plans if not _read_back(work, p, tally)]))
    todo_lock, stop = threading.Lock(), threading.Event()
    # SIGTERM or ^C: finish the runs in flight, start no more (and print the table).
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGTERM, signal.SIGINT)}

    def worker(s3: MotoS3) -> None:
        while time.monotonic() - began < time_limit and not stop.is_set():
            with todo_lock:
                if not todo:
                    return
                plan = todo.pop()
            own = Tally()
            try:
                Run(plan, s3, work, fault_rate, own, references, ref_lock).execute()
            except Exception as exc:  # a broken harness must show, not stop the other runs
                own.problem(f"run {plan.index}: harness error {type(exc).__name__}: {exc}")
            folder = work / _run_folder(plan)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "tally.json").write_text(json.dumps(own.to_json()))
            tally.merge(own)

    with MotoS3() as s3:
        threads = [threading.Thread(target=worker, args=(s3,), daemon=True) for _ in range(max(1, jobs))]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.5)  # a signal handler runs between joins
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    with (work / "starts.jsonl").open("a") as f:  # a campaign started again adds its time to the earlier ones
        f.write(json.dumps({"seconds": time.monotonic() - began}) + "\n")
    tally.seconds = sum(json.loads(line)["seconds"] for line in (work / "starts.jsonl").read_text().splitlines())
    tally.not_started = sum(len(p.kills) for p in todo)
    return tally


def table(t: Tally, args: argparse.Namespace) -> str:
    mean = sum(t.redone) / len(t.redone) if t.redone else 0.0
    rows = [
        ("command", " ".join(["python benchmarks/chaos.py", f"--seed {args.seed}", f"--trials {args.trials}",
                              f"--fault-rate {args.fault_rate}", f"--jobs {args.jobs}",
                              f"--two-rank-share {args.two_rank_share}", f"--big-share {args.big_share}"])),
        ("trials (kills planned)", f"{t.trials} in {t.runs} runs ({t.finished_runs} finished and compared, "
                                   f"{t.finished_at_kill} finished by the killed start), {t.seconds:.0f} s"),
        ("kills per mode", ", ".join(f"{k} {v}" for k, v in sorted(t.kills.items()))),
        ("kill moment never came", ", ".join(f"{k} {v}" for k, v in sorted(t.kills_missed.items())) or "0"),
        ("planned, not run", f"{t.dropped} (run already finished), {t.not_started} (time limit or stopped)"),
        ("faults per kind", ", ".join(f"{k} {v}" for k, v in sorted(t.faults.items()))
         + f" (of {t.requests} requests)"),
        ("save due/in flight, never committed", ", ".join(f"{k} {v}" for k, v in sorted(t.never_committed.items()))
         or "0"),
        ("invalid chosen", str(t.invalid_chosen)),
        ("not the newest committed", str(t.not_newest)),
        ("committed lost", str(t.committed_lost)),
        ("final state != uninterrupted", str(t.bitwise_mismatch)),
        ("bucket hygiene failures", str(t.hygiene_failures)),
        ("supervisor misread the bucket", str(t.supervisor_misread)),
        ("mean work redone (steps)", f"{mean:.2f} over {len(t.redone)} resumes"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--fault-rate", type=float, default=0.05, help="share of requests failed (all kinds together)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--two-rank-share", type=float, default=0.1, help="share of runs that are 2-rank torchrun jobs")
    p.add_argument("--big-share", type=float, default=0.05, help="share of 1-rank runs with a 33 MiB component")
    p.add_argument("--time-limit", type=float, default=6 * 3600, help="start no new run after this many seconds")
    p.add_argument("--work", default=None, help="folder for logs (default: a temporary one, kept)")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    t = campaign(args.seed, args.trials, args.fault_rate, args.jobs, args.two_rank_share, args.big_share, work,
                 args.time_limit)
    print(table(t, args))
    for line in t.problems[:50]:
        print("problem:", line)
    print(f"logs: {work}")
    bad = (t.invalid_chosen + t.not_newest + t.committed_lost + t.bitwise_mismatch + t.hygiene_failures
           + t.supervisor_misread)
    return 1 if bad or t.problems else 0


if __name__ == "__main__":
    sys.exit(main())
