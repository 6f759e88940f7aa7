"""Directory-sync mode (`runner start --sync-dir DIR`): a folder of checkpoints <-> the run's snapshots.

For training scripts that checkpoint on their own (GPT-SoVITS's trainer
writes `G_<step>.pth`/`D_<step>.pth` into its logs folder), SageMaker-style.
Owns: choosing the sync snapshot DIR is restored from before the child
starts (restore.py puts its files in place); watching DIR while the child
runs (scan.py) and committing its whole state as snapshots, reason "sync"
(publish.py); the last sync on a termination notice and when the child ends,
"final" after a clean exit (settle.py); the step of a sync snapshot.  What
one file holds (its stored name, whether it is whole, its step) is
files.py; the state and thread of one sync, `DirSync`, sync.py.  The
supervisor (run.py) decides when to call it.

Design notes (why):

- Every sync snapshot lists the WHOLE settled state of DIR and is
  self-contained: files that changed are uploaded into the new snapshot's
  prefix, files that did not are copied server-side (S3 CopyObject, a local
  copy) from the previous sync snapshot's prefix.  So the manifest format,
  RunReader, verify, fork and retention are unchanged and stay correct:
  deleting a snapshot never removes bytes another manifest needs.  Rejected:
  re-uploading unchanged files (slow inside a notice window, and a file that
  is being rewritten has no good local copy to upload), and manifests that
  point into older snapshots (every reader, retention and fork would have to
  follow references, and retention could delete data a kept manifest uses).
  The price is storage: keep_last K snapshots hold up to K copies of DIR.
  Copies are `Store.copy` (S3 CopyObject; copy + rename on a local folder).
- A polling scan (every `scan_s`, 2 s by default), not inotify: it works the
  same in containers, on bind mounts and on network filesystems (NFS, EFS,
  FUSE mounts of buckets), where inotify misses writes made by other hosts
  or is not available at all; it needs no dependency (`watchdog` falls back
  to polling in exactly those cases anyway); a 2 s scan of a logs folder of
  a few hundred files costs well under a millisecond of CPU per second.
- When a file counts as written ("settled"): its (size, mtime, inode) have
  not changed for `settle_s`.  A torch checkpoint (`torch.save`'s zip format:
  it starts with `PK\\x03\\x04`) counts only as a whole version (files.py:
  end record in place, the same stat before and after the read, every
  CRC-32 right), and then at once, without waiting out `settle_s`.  So a
  half-written or torn `.pth` is never uploaded, even when its writer
  pauses longer than the settle period.  The snapshot keeps the previous
  version of a file that is still in flight.
- A torch file rewritten in place (nanoGPT's `ckpt.pt`, saved every few
  iterations) may never stay unchanged from one scan to the next, so a scan
  that finds one being written, or that reads it as it changes, "catches"
  it: looks every 10 ms, until the next scan is due, for the moment between
  two saves, and publishes the first whole version it reads.  So the newest
  whole version is published at every scan that finds a new one, however
  often it is rewritten, as long as it stays whole for longer than one read
  of it takes (a file rewritten with no pause at all has no whole moment).
- When a sync is committed: as soon as a settled change touches a checkpoint
  file (`.pth`, `.pt`, `.ckpt`, `.safetensors`); changes to other files
  (train.log, TensorBoard events) ride along, or are committed on their own
  at most every `interval_s`, so that a log written every few seconds does
  not copy every checkpoint every few seconds.  A rebalance recommendation,
  a termination notice and the child's end sync at once.  A termination
  waits for checkpoint files in flight until the stop plan's ack time, for
  other files one settle period at most; a file that never stays unchanged
  for `settle_s` (a chatty log) is synced only when it pauses.
- The step of a sync snapshot: that of the newest (by mtime) file it holds
  that has one (files.py: `--sync-step-from`, then a number in a
  checkpoint's name or `checkpoint-N` folder, then an `iter_num` /
  `global_step` / `step` key inside it), never less than the previous
  sync's step, so that the newest state always sorts newest.  A snapshot
  with no such file gets the previous step + 1 (a sync counter, the last
  resort).  Files whose step is inside them are read before the others
  (the snapshot id holds the step), so they are held in memory together.
- File names (files.py): safe segments as they are, others as `_b32.` +
  base32.  Symlinks, sockets and our own `.runner-*` temporaries are not
  synced.
- Restore (restore.py) never leaves a mix of two snapshots in DIR; a
  corrupt snapshot is skipped for the previous one.
- When the child dies, whatever it was still writing is suspect: that exact
  file state is never uploaded (a later, different state of the file is).
  A suspect checkpoint is also taken out of the restarted child's way: put
  back to its synced version, or moved to DIR/.runner-partial/ (a trainer
  that loads its newest `G_*.pth` would otherwise crash on it forever).

Whole files are read into memory to be hashed and uploaded (the store has
whole-object writes only), one file at a time.
"""

from runner.supervisor.syncdir.files import (
    ENCODED_PREFIX,
    decode_path,
    encode_path,
    parse_step_rule,
    step_from_name,
    zip_complete,
)
from runner.supervisor.syncdir.restore import SyncDirError
from runner.supervisor.syncdir.state import SYNC_MARKER, is_checkpoint, is_sync_snapshot
from runner.supervisor.syncdir.sync import DirSync

__all__ = [
    "ENCODED_PREFIX",
    "SYNC_MARKER",
    "DirSync",
    "SyncDirError",
    "decode_path",
    "encode_path",
    "is_checkpoint",
    "is_sync_snapshot",
    "parse_step_rule",
    "step_from_name",
    "zip_complete",
]
