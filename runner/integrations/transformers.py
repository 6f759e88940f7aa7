"""Hugging Face `Trainer` inside runner: the Trainer's own `checkpoint-N/` folders, published as runner snapshots.

Owns `RunnerCallback` (a `TrainerCallback`) and `restore_checkpoint`:

    cb = RunnerCallback.from_env()                # what `runner start` passes; keywords override
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train(resume_from_checkpoint=cb.restore(args.output_dir))

Design notes (why it is built this way):

- The Trainer saves, runner publishes.  A `checkpoint-N/` folder (model
  weights, optimizer, scheduler, RNG, trainer_state.json) is what the Trainer
  resumes from exactly, so the snapshot holds that folder file for file
  (folder_snapshot.py); the snapshot's step is N, reason periodic, emergency
  or final.  Nothing is re-serialized and runner unpickles nothing: the
  Trainer loads its own files (with `weights_only=True` in transformers 5).
- When: `on_step_end` polls the control channel (runner.control: SIGUSR1/2
  and request.json).  A stop request sets `should_save` and
  `should_training_stop`, so the Trainer writes `checkpoint-N` at this very
  step; `on_save` publishes it synchronously, acknowledges, and the Trainer
  stops.  The last step is always saved (reason final: the run is finished).
- Periodic saves (the Trainer's `save_steps`, or `save_every_steps=` here)
  publish in the background (one at a time, runner's BackgroundWriter); the
  training thread pays only for listing the folder.  The next save waits for
  it in `on_step_end`, before the Trainer writes and rotates (`save_total_limit`
  deletes old folders right after a save), so no folder is deleted mid-upload.
- Retention in the bucket is runner's (keep-K + pins, checkpoint/retention.py)
  after every commit; `save_total_limit` only bounds the local disk.
- Restore on a fresh machine: the newest valid snapshot of this integration
  (RUNNER_RESUME, set by `runner start`, names it) is downloaded, every file
  checked against the manifest, and renamed into `output_dir/checkpoint-N`;
  a corrupt one is skipped for the previous one.  Local `checkpoint-M` folders
  with M beyond it (a save the bucket never got, perhaps torn) are moved to
  `output_dir/.runner-set-aside/`, so `resume_from_checkpoint=True` picks ours.
- One process only for now (no DDP/FSDP/DeepSpeed): a multi-process run is
  refused at `on_train_begin` rather than saved wrongly.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # an optional extra: say how to get it
    raise ImportError("runner.integrations.transformers needs transformers: "
                      f"pip install 'runner[transformers]' ({exc})") from None

from runner import control
from runner.control import lease
from runner.checkpoint import retention
from runner.checkpoint.manifest import Manifest, Reason
from runner.checkpoint.reader import CorruptSnapshotError, RunReader
from runner.checkpoint.settings import CheckpointSettings
from runner.checkpoint.writer import BackgroundWriter, CommitResult
from runner.errors import ConfigError
from runner.integrations import folder_snapshot
from runner.integrations.folder_snapshot import FolderSave
from runner.storage import StorageError, Store

log = logging.getLogger("runner.integrations")

MARKER = "integration"
FORMAT = "transformers"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _settings(**overrides: Any) -> CheckpointSettings:
    """RUNNER_* settings with keyword overrides; ConfigError (one clear line) when unusable."""
    from pydantic import ValidationError

    try:
        settings = CheckpointSettings.from_env(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        hint = " (run under `runner start`, set RUNNER_BUCKET, or pass bucket=...)" if field == "bucket" else ""
        raise ConfigError(f"invalid {field}: {first['msg']}{hint}") from None
    except ValueError as exc:  # RUNNER_STORAGE_OPTIONS that is not JSON
        raise ConfigError(f"invalid RUNNER_STORAGE_OPTIONS: {exc}") from None
    return settings


def is_transformers_snapshot(manifest: Manifest) -> bool:
    return manifest.extra.get(MARKER) == FORMAT


class RunnerCallback(TrainerCallback):
    """Saves at the next step on a notice, stops the Trainer, publishes every `checkpoint-N/` as a snapshot.

    Keywords: bucket, run_id, keep_last, storage_options, resume, async_save
    (RUNNER_* when not given), and `save_every_steps` (default: none of
    runner's, the Trainer's `save_steps` decides).
    Raises ConfigError on bad settings, StorageError when the bucket is unusable.
    """

    def __init__(self, bucket: str | None = None, run_id: str | None = None, *,
                 save_every_steps: int | None = None, **settings: Any):
        self.settings = _settings(bucket=bucket, run_id=run_id, **settings)
        self.save_every_steps = save_every_steps
        if isinstance(save_every_steps, str) and save_every_steps.strip().lower() == control.AUTO:
            raise ConfigError("save_every_steps='auto' is not supported by the Transformers callback: the Trainer "
                              "saves (save_steps); pass a number of steps, or none")
        if save_every_steps is not None and (not isinstance(save_every_steps, int) or save_every_steps < 1):
            raise ConfigError(f"save_every_steps must be a number of steps (1 or more), not {save_every_steps!r}")
        self.store = Store(self.settings.bucket, self.settings.storage_options)
        self.store.check()
        self.reader = RunReader(self.store, self.settings.run_id)
        self.policy = retention.KeepLastN(self.settings.keep_last)
        self.channel = control.ChildChannel(self.settings.control_dir)
        control.install_signal_handlers()
        self._writer = BackgroundWriter(self._commit)
        self._request: control.Request | None = None  # answered by the next on_save
        self._save_asked_at: float | None = None  # when on_step_end let the Trainer save
        self._waited_s = 0.0  # how long on_step_end waited for the previous upload
        self.last_snapshot: Manifest | None = None
        self.commits: list[dict[str, Any]] = []  # one record per commit: step, reason, stall and save times

    @classmethod
    def from_env(cls, **overrides: Any) -> "RunnerCallback":
        """Settings from what `runner start` passes (RUNNER_*); keywords override."""
        return cls(**overrides)

    @property
    def run_id(self) -> str:
        return self.settings.run_id

    # -- restore -------------------------------------------------------------

    def restore(self, output_dir: str | os.PathLike) -> str | None:
        """Put the newest valid snapshot into `output_dir/checkpoint-N`; its path, or None on a fresh run.

        Pass the result to `trainer.train(resume_from_checkpoint=...)`.
        Raises StorageError when the store fails while reading.
        """
        manifest = restore_into(self.reader, Path(output_dir), self.settings.resume)
        self.last_snapshot = manifest or self.last_snapshot
        return str(Path(output_dir) / manifest.extra["folder"]) if manifest is not None else None

    # -- the Trainer's events ------------------------------------------------

    def on_train_begin(self, args, state, control_, **kwargs):
        if getattr(args, "world_size", 1) > 1:
            raise ConfigError("runner's Transformers callback supports one process only (world_size 1) for now")

    def on_step_end(self, args, state, control_, **kwargs):
        step = state.global_step
        self.channel.progress(step)
        request = self.channel.poll()
        if request is not None:
            self._request = request
            control_.should_save = True
            control_.should_training_stop = control_.should_training_stop or request.action == control.STOP
            log.info("run %s: %s requested; saving at step %d", self.run_id, request.action, step)
        elif control.preemption_requested():
            control_.should_training_stop = True  # already answered: just stop
        if self.save_every_steps and step % self.save_every_steps == 0:
            control_.should_save = True
        if step >= state.max_steps:
            control_.should_save = True  # the final snapshot marks the run finished
        if control_.should_save:
            began = time.perf_counter()
            self._wait_quietly()  # before the Trainer writes and rotates its folders
            self._save_asked_at = time.perf_counter()
            self._waited_s = self._save_asked_at - began  # a stall of this save's too
        return control_

    def on_save(self, args, state, control_, **kwargs):
        began = time.perf_counter()
        trainer_save_s = began - self._save_asked_at if self._save_asked_at is not None else None
        step = state.global_step
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        request, self._request = self._request, None
        # The last step is final even on a notice: a run stopped there is finished, not to be resumed.
        reason = (Reason.FINAL if step >= state.max_steps
                  else Reason.EMERGENCY if request and request.action == control.STOP
                  else Reason.MANUAL if request else Reason.PERIODIC)
        save = FolderSave(folder=folder, step=step, reason=reason,
                          parent=self.last_snapshot.snapshot_id if self.last_snapshot else None,
                          epoch=int(state.epoch or 0), metrics=_metrics(state),
                          extra={MARKER: FORMAT, "folder": folder.name})
        if reason is Reason.PERIODIC and self.settings.async_save:
            self._writer.submit(save)
            self._note(step, reason, trainer_save_s, self._waited_s + time.perf_counter() - began)
            return control_
        result = self._save_now(save, reason)
        if result is not None and request is not None:
            self.channel.ack(request, result.manifest.snapshot_id, step)
        self._note(step, reason, trainer_save_s, self._waited_s + time.perf_counter() - began)
        return control_

    def on_train_end(self, args, state, control_, **kwargs):
        self._wait_quietly()

    # -- saving --------------------------------------------------------------

    def _save_now(self, save: FolderSave, reason: Reason) -> CommitResult | None:
        """Publish on the training thread (emergency, manual, final); a failure is logged, not raised."""
        try:
            self._writer.wait()
        except (StorageError, OSError, ValueError, RuntimeError) as exc:
            log.warning("the previous periodic save failed (%s); saving again now", exc)
        try:
            return self._commit(save, blocking=True)
        except lease.LeaseLostError as exc:
            log.error("%s; stopping", exc)
        except (StorageError, OSError, ValueError, RuntimeError) as exc:
            log.error("run %s: %s snapshot of step %d NOT committed: %s", self.run_id, reason.value, save.step, exc)
        return None

    def _wait_quietly(self) -> None:
        try:
            self._writer.wait()
        except lease.LeaseLostError as exc:
            log.error("%s; nothing more is committed", exc)
        except (StorageError, OSError, ValueError, RuntimeError) as exc:
            log.warning("a periodic save failed (%s); training goes on, the next save tries again", exc)

    def _commit(self, save: FolderSave, blocking: bool = False) -> CommitResult:
        """Publish, report to the supervisor, apply retention (only after this commit succeeded)."""
        result = folder_snapshot.publish_folder(self.store, self.run_id, save, fence=self._fence)
        manifest = result.manifest
        self.last_snapshot = manifest
        log.info("run %s: committed snapshot %s (step %d, %s) in %.2fs", self.run_id, manifest.snapshot_id,
                 manifest.step, manifest.reason.value, result.write_seconds)
        stall = result.write_seconds if blocking else 0.0
        self.channel.committed(manifest.snapshot_id, manifest.step, manifest.reason.value,
                               stall_s=stall, write_s=result.write_seconds)
        try:
            retention.apply(self.reader, retention.plan(self.reader, self.policy, protect={manifest.snapshot_id}))
        except StorageError as exc:
            log.warning("retention skipped: %s", exc)
        return result

    def _fence(self) -> None:
        """Refuse to commit once another instance holds a newer lease on the run (see runner.control.lease)."""
        lease.fence(self.store, self.run_id)

    def _note(self, step: int, reason: Reason, trainer_save_s: float | None, stall_s: float) -> None:
        record = {"step": step, "reason": reason.value, "stall_s": stall_s, "trainer_save_s": trainer_save_s}
        self.commits.append(record)
        log.info("run %s: step %d %s save: the Trainer's own save %s, runner's stall %.3f s", self.run_id, step,
                 reason.value, f"{trainer_save_s:.3f} s" if trainer_save_s is not None else "-", stall_s)

    def close(self) -> None:
        """Wait for the save in flight and release the writer thread."""
        try:
            self._wait_quietly()
        finally:
            self._writer.close()


def _metrics(state: Any) -> dict[str, float]:
    """The newest logged loss, if any (shown by `runner ls`)."""
    for entry in reversed(getattr(state, "log_history", None) or []):
        if isinstance(entry.get("loss"), (int, float)):
            return {"loss": float(entry["loss"])}
    return {}


def restore_checkpoint(output_dir: str | os.PathLike, **settings: Any) -> str | None:
    """`RunnerCallback(**settings).restore(output_dir)` without keeping a callback. Raises as those do."""
    cb = RunnerCallback(**settings)
    try:
        return cb.restore(output_dir)
    finally:
        cb.close()


def restore_into(reader: RunReader, output_dir: Path, resume: str = "latest") -> Manifest | None:
    """Restore the newest valid snapshot of this integration (or `resume`) into `output_dir`; the manifest or None."""
    if resume == "none":
        return None
    for manifest in _candidates(reader, resume):
        try:
            folder_snapshot.restore_folder(reader, manifest, output_dir / manifest.extra["folder"])
        except CorruptSnapshotError as exc:
            log.warning("snapshot %s (step %d) is unusable (%s); trying the previous one",
                        manifest.snapshot_id, manifest.step, exc)
            continue
        _set_aside_newer(output_dir, manifest.step)
        log.info("run %s: restored snapshot %s (step %d) into %s", reader.run_id, manifest.snapshot_id,
                 manifest.step, output_dir / manifest.extra["folder"])
        return manifest
    _set_aside_newer(output_dir, -1)
    log.info("run %s: no snapshot yet, starting fresh", reader.run_id)
    return None


def _candidates(reader: RunReader, resume: str):
    """The named snapshot first (when valid), then every valid one of this integration, newest first."""
    tried: set[str] = set()
    if resume != "latest":
        status = reader.status(resume)
        if status.valid and is_transformers_snapshot(status.manifest):  # type: ignore[arg-type]
            tried.add(resume)
            yield status.manifest
        else:
            log.warning("resume snapshot %s is not usable (%s); using the newest valid one", resume,
                        status.problem or "not a Transformers snapshot")
    for manifest in reader.valid_snapshots():
        if manifest.snapshot_id in tried:
            continue
        if not is_transformers_snapshot(manifest) or not _CHECKPOINT.match(str(manifest.extra.get("folder"))):
            log.warning("skipping snapshot %s: not written by the Transformers integration", manifest.snapshot_id)
            continue
        yield manifest


def _set_aside_newer(output_dir: Path, step: int) -> None:
    """Move local checkpoint folders beyond `step` (never published, perhaps torn) out of the Trainer's way."""
    if not output_dir.is_dir():
        return
    for path in output_dir.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir() and int(match.group(1)) > step:
            folder_snapshot.set_aside(path)
