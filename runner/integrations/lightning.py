"""PyTorch Lightning inside runner: Lightning's own checkpoint, published as a runner snapshot.

Owns `RunnerCheckpoint` (a Lightning `Callback`) and `RunnerCheckpointIO` (the
`CheckpointIO` plugin it installs); re-exports `ResumableDataLoader`
(integrations/resumable_loader.py), whose position Lightning saves:

    ckpt = RunnerCheckpoint.from_env()            # what `runner start` passes
    trainer = L.Trainer(callbacks=[ckpt], enable_checkpointing=False, ...)
    trainer.fit(model, ResumableDataLoader(ds, batch_size=32, shuffle=True),
                ckpt_path=ckpt.resume_path())

Design notes (why it is built this way):

- One snapshot format.  The callback drives a `runner.Checkpointer` with one
  component, the dict `trainer.save_checkpoint` produces (taken through the
  plugin, Lightning's public route to it), so a snapshot is a manifest plus
  `lightning.pt` (a plain Lightning `.ckpt`, loadable by Lightning alone) and
  `_rng.pt`; data under a fresh prefix, the manifest created exclusively
  last, SHA-256 of each file, keep-K + pins, the lease fence, progress,
  acknowledgements and the cost ledger's commits all come from the
  Checkpointer.  The snapshot's step is `trainer.global_step`.
- When to save: at the end of every batch that completed an optimizer step
  (`on_train_batch_end`, where Lightning's own step-based ModelCheckpoint
  saves, so its restart logic expects it) the callback polls the control
  channel.  On a stop request it saves synchronously, acknowledges, and sets
  `trainer.should_stop`; periodic saves copy the state to host memory and
  commit in the background.  A fit that ends by itself saves a final snapshot.
- Loading stays safe by `torch.load(weights_only=True)` on a file whose
  SHA-256 the manifest vouched for: `resume_path()` downloads the newest valid
  snapshot's file, checks it against its checksum while reading, and then
  test-unpickles it with `weights_only=True` (memory-mapped, so tensors are not
  read); the plugin's `load_checkpoint` loads it with `weights_only=True`
  again.  Lightning's checkpoint does hold non-tensor objects, but only plain
  containers of numbers and strings once runner's host copy has turned
  `AttributeDict` hyper-parameters into dicts; anything else (a user's class in
  the hyper-parameters) is refused unless named in `safe_globals=`.
  The plugin pins `weights_only=True` because Lightning's own load path
  passes the user's choice through (and picks False for http URLs), and a
  full unpickle would run whatever the bucket's writer pickled.
- Exact resume: Lightning restores model, optimizers, schedulers and loop
  counters; runner adds the RNG streams (Lightning saves none; dropout would
  diverge), restored at `on_train_start`, and `ResumableDataLoader` gives
  Lightning a data position to save (a plain DataLoader restarts its epoch
  from the first batch on a mid-epoch resume).
- One process (`devices=1`) for now: a multi-process strategy is refused at
  setup rather than saved wrongly.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO

from runner import control
from runner.checkpoint import Checkpointer, state
from runner.checkpoint.manifest import Manifest, Reason
from runner.checkpoint.reader import CorruptSnapshotError
from runner.errors import ConfigError, SnapshotNotFoundError, UnsafeDataError
from runner.integrations.resumable_loader import ResumableDataLoader

log = logging.getLogger("runner.integrations.lightning")

COMPONENT = "lightning"  # the snapshot's file `lightning.pt` holds Lightning's checkpoint dict

__all__ = ["COMPONENT", "ResumableDataLoader", "RunnerCheckpoint", "RunnerCheckpointIO"]


class RunnerCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O through runner: saves become snapshots, loads are weights-only.

    `trainer.save_checkpoint(path)` (yours, or a ModelCheckpoint's) commits a
    snapshot of the run; `path` is only a label.  `remove_checkpoint` deletes
    nothing: retention is runner's keep-K + pins.
    """

    def __init__(self, owner: "RunnerCheckpoint", safe_globals: Sequence[Any] = ()):
        self._owner = owner
        self._safe_globals = list(safe_globals)
        self._catch: list[dict[str, Any]] | None = None  # armed by capture(): hand the dict over, commit nothing
        self._ours: set[str] = set()  # local files resume_path() verified

    def capture(self, trainer: Any) -> dict[str, Any]:
        """Lightning's checkpoint dict, exactly what `trainer.save_checkpoint` would write."""
        self._catch = []
        try:
            trainer.save_checkpoint("runner-capture", weights_only=False)
            return self._catch[0]
        finally:
            self._catch = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if self._catch is not None:
            self._catch.append(checkpoint)
            return
        self._owner._save_given(checkpoint)  # a save Lightning (or the user) asked for

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Load with `weights_only=True`; `weights_only=False` is honoured only for a file runner did not fetch.

        Raises UnsafeDataError for anything but tensors and plain data.
        """
        if weights_only is False and str(path) not in self._ours:
            return TorchCheckpointIO().load_checkpoint(path, map_location=map_location, weights_only=False)
        return self.safe_load(str(path), map_location=map_location)

    def safe_load(self, path: str, map_location: Any = None, mmap: bool = False) -> dict[str, Any]:
        try:
            with torch.serialization.safe_globals(self._safe_globals):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            raise UnsafeDataError(
                f"refusing to load {os.path.basename(path)}: it holds more than tensors and plain data "
                f"({state.unpickling_reason(exc)}); if that is your own class, name it in safe_globals=") from None
        except (RuntimeError, EOFError, ValueError) as exc:
            raise UnsafeDataError(f"cannot read {os.path.basename(path)} as a Lightning checkpoint ({exc})") from None

    def remove_checkpoint(self, path: Any) -> None:
        log.debug("not removing %s: retention is runner's (keep-K and pins)", path)


class _TrainerState:
    """The Checkpointer's one component: the trainer's checkpoint dict (Lightning restores it itself)."""

    def __init__(self, io: RunnerCheckpointIO):
        self.io = io
        self.trainer: Any = None
        self.given: dict[str, Any] | None = None  # a dict Lightning already made (ModelCheckpoint, user)

    def state_dict(self) -> dict[str, Any]:
        if self.given is not None:
            return self.given
        return self.io.capture(self.trainer)

    def load_state_dict(self, _: Any) -> None:
        raise AssertionError("Lightning loads its checkpoint itself (trainer.fit(ckpt_path=...))")


class RunnerCheckpoint(Callback):
    """Saves Lightning's checkpoint as runner snapshots; stops the trainer on a preemption notice.

    Settings are the Checkpointer's (`bucket`, `run_id`, `save_every_steps`,
    `keep_last`, `storage_options`, `resume`, `async_save`); `from_env()` takes
    them from what `runner start` passes.  `safe_globals`: classes your
    checkpoint holds beyond plain data (see the module notes); `cache_dir`:
    where `resume_path()` puts the fetched file (a temporary folder by default).

    Raises ConfigError on bad settings, StorageError when the bucket is unusable.
    """

    def __init__(self, bucket: str | None = None, run_id: str | None = None, *,
                 safe_globals: Sequence[Any] = (), cache_dir: str | None = None,
                 _from_env: bool = False, **settings: Any):
        control.install_signal_handlers()  # first: a notice may come before the trainer exists
        self.io = RunnerCheckpointIO(self, safe_globals)
        self._state = _TrainerState(self.io)
        if _from_env:
            self.checkpointer = Checkpointer.from_env(bucket=bucket, run_id=run_id, lightning=self._state, **settings)
        else:
            self.checkpointer = Checkpointer(bucket, run_id, lightning=self._state, **settings)
        self.cache_dir = cache_dir
        self.preempted = False  # a stop request was saved: the fit ended early, not finished
        self.resumed_from: Manifest | None = None
        self._rng: dict[str, Any] | None = None  # the resumed snapshot's RNG streams, for on_train_start
        self._fetched: str | None = None
        self._last_step: int | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> "RunnerCheckpoint":
        """Settings from RUNNER_* (what `runner start` passes); keywords override."""
        return cls(_from_env=True, **overrides)

    @property
    def run_id(self) -> str:
        return self.checkpointer.run_id

    # -- resume ----------------------------------------------------------------

    def resume_path(self) -> str | None:
        """A local path to the newest valid snapshot's checkpoint, for `trainer.fit(ckpt_path=...)`; None if fresh.

        Checks every byte against the manifest's SHA-256 and test-loads it with
        `weights_only=True`; a corrupt or unsafe snapshot is skipped with a
        warning and the previous one is tried.  Raises SnapshotNotFoundError
        when `resume=` names an unusable snapshot, UnsafeDataError when no
        snapshot is usable and some were refused as unsafe (starting afresh
        would silently discard the run), StorageError when the store fails.
        """
        refused = 0
        for manifest, named in self._candidates():
            try:
                return self._fetch(manifest)
            except (CorruptSnapshotError, UnsafeDataError) as exc:
                if named:
                    raise SnapshotNotFoundError(f"snapshot {manifest.snapshot_id} is unusable: {exc}") from None
                refused += isinstance(exc, UnsafeDataError)
                log.warning("snapshot %s (step %d) is unusable (%s); trying the previous one",
                            manifest.snapshot_id, manifest.step, exc)
        if refused:
            raise UnsafeDataError(f"run {self.run_id}: no snapshot could be loaded safely ({refused} refused); "
                                  "not starting afresh over them")
        log.info("run %s: no snapshot yet, starting fresh", self.run_id)
        return None

    def _candidates(self) -> Iterator[tuple[Manifest, bool]]:
        """(manifest, named by the user) newest first, as Checkpointer.restore orders them."""
        settings, reader = self.checkpointer.settings, self.checkpointer.reader
        if settings.resume == "none":
            return
        seen = set()
        if settings.resume != "latest":
            status = reader.status(settings.resume)
            if status.valid:
                seen.add(settings.resume)
                yield status.manifest, False  # type: ignore[misc]
            else:
                log.warning("resume snapshot %s is not usable (%s); using the newest valid one",
                            settings.resume, status.problem)
        for manifest in reader.valid_snapshots():
            if manifest.snapshot_id not in seen:
                yield manifest, False

    def _fetch(self, manifest: Manifest) -> str:
        """Download, verify and test-load one snapshot; returns the local path."""
        reader = self.checkpointer.reader
        entry = manifest.file(COMPONENT)
        if entry is None:
            raise CorruptSnapshotError(f"it has no {COMPONENT} checkpoint (not written by the Lightning integration)")
        data = reader.read_file(manifest, entry)  # raises unless size and SHA-256 match
        rng_entry = manifest.file(state.RNG_COMPONENT)
        rng = state.deserialize(reader.read_file(manifest, rng_entry)) if rng_entry is not None else None
        folder = self.cache_dir or tempfile.mkdtemp(prefix="runner-lightning-")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{manifest.snapshot_id}.ckpt")
        tmp = f"{path}.part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        try:
            self.io.safe_load(path, map_location="cpu", mmap=True)  # unpickles only; tensors stay on disk
        except UnsafeDataError:
            os.unlink(path)
            raise
        self.io._ours.add(path)
        self._rng, self._fetched, self.resumed_from = rng, path, manifest
        log.info("run %s: resuming from snapshot %s (step %d, %s)", self.run_id, manifest.snapshot_id,
                 manifest.step, manifest.reason.value)
        return path

    # -- Lightning hooks -------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.world_size > 1:
            raise ConfigError("runner's Lightning integration supports one process (devices=1) for now; "
                              f"this trainer has {trainer.world_size}")
        strategy = trainer.strategy
        if strategy.checkpoint_io is not self.io:
            if type(strategy.checkpoint_io) is not TorchCheckpointIO:
                raise ConfigError(f"the trainer already has a {type(strategy.checkpoint_io).__name__} plugin; "
                                  "runner needs its own CheckpointIO (remove the other one)")
            strategy.checkpoint_io = self.io  # before Lightning restores ckpt_path, which it reads through it
        self._state.trainer = trainer

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # After Lightning's restore and the data loader's first iterator: the next draw is the saved run's next draw.
        if self._rng is not None:
            state.restore_rng(self._rng)
            self._rng = None
        if self._fetched is not None:
            self.io._ours.discard(self._fetched)
            _remove(self._fetched, folder_too=self.cache_dir is None)  # a local cache; the bucket holds the snapshot
            self._fetched = None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # accumulating gradients: not a step boundary, nothing consistent to save
        self._last_step = step
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 0)() == 1}
        if self.checkpointer.step(step, epoch=trainer.current_epoch, metrics=metrics):
            self.preempted = True
            trainer.should_stop = True
            log.info("run %s: stopping the trainer at step %d, as asked", self.run_id, step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        resumed = self.resumed_from
        if resumed is not None and resumed.final and trainer.global_step == resumed.step:
            return  # resumed a finished run: it is marked finished already
        if not self.preempted and not control.preemption_requested():
            self.checkpointer.save(trainer.global_step, epoch=trainer.current_epoch, final=True)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._wait_quietly()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._wait_quietly()

    def close(self) -> None:
        """Wait for the save in flight and release the writer thread."""
        self.checkpointer.close()

    # -- internals -------------------------------------------------------------

    def _save_given(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint Lightning made on its own (ModelCheckpoint, trainer.save_checkpoint): a manual snapshot."""
        if "optimizer_states" not in checkpoint:  # resuming from it would fail: never let it be the newest
            log.warning("not publishing a weights-only checkpoint as a snapshot: it cannot resume training")
            return
        self._state.given = checkpoint
        try:
            self.checkpointer.save(int(checkpoint.get("global_step", 0)), epoch=int(checkpoint.get("epoch", 0)),
                                   reason=Reason.MANUAL)
        finally:
            self._state.given = None

    def _wait_quietly(self) -> None:
        try:
            self.checkpointer.wait()
        except Exception as exc:  # a periodic save that failed: logged, the fit's own outcome stands
            log.warning("the last periodic save failed: %s", exc)


def _remove(path: str, folder_too: bool) -> None:
    try:
        os.unlink(path)
        if folder_too:
            os.rmdir(os.path.dirname(path))
    except OSError:
        pass
