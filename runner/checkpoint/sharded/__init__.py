"""Sharded snapshots of torchrun jobs, through torch.distributed.checkpoint (DCP).

Save (every rank, the same step), in two halves.  `spool`, on the training
thread: DCP plans the job-wide state dict and each rank writes its shards
into one local spool file (`__<rank>_0.distcp`, DCP's own format) beside its
RNG streams (`rank-<rank>.pt`: they differ per rank); that is the training
stall.  `commit`, on the Checkpointer's writer thread for periodic saves (on
the caller's for the others): each rank publishes its files under the
snapshot's fresh prefix, over a gloo group of the writer threads' own.  One gather tells
rank 0 that every rank's files are in the store, with their sizes and
SHA-256; only then does rank 0 write the sharding plan (`dcp-plan.json`,
JSON instead of DCP's pickled `.metadata`, see dcp_metadata.py) and create the
manifest exclusively.  A rank that dies or fails anywhere before that leaves
no manifest, so no snapshot; the outcome is broadcast so every rank returns
the same result or raises the same error.

Restore: rank 0 picks the snapshot and every rank loads that one.  DCP asks
our storage reader for byte ranges of shard files; the reader fetches each
file it needs whole, checks its SHA-256 against the manifest before handing
out any byte, and non-tensor values are unpickled with `weights_only=True`.
DCP reshards to the current world size, so a job saved by 4 ranks resumes
on 2 or 3.

Modules and optimizers go through `torch.distributed.checkpoint.state_dict`
(`get_model_state_dict` / `get_optimizer_state_dict`), which gives DDP and
FSDP2 models the same keys as the bare model and initialises a fresh
optimizer's state so that DCP can load into it.  Every other component's
`state_dict()` must be the same on every rank (DCP saves replicated values
once); what differs per rank belongs in the RNG file or in a DTensor.

The ranks talk over a gloo group of their own (`Group`), whatever backend the
training uses: its collectives are on small CPU objects, once per step for
the stop flag and a few times per save.

Modules: group.py (the ranks' own group, file names), save.py (spool,
commit), restore.py (load), dcp_metadata.py (the plan as JSON).
"""

from runner.checkpoint.sharded.group import PLAN_COMPONENT, PLAN_FILE, SHARD_COMPONENT, Group, SaveFailed, active, rng_file
from runner.checkpoint.sharded.restore import load
from runner.checkpoint.sharded.save import Spooled, commit, save, spool

__all__ = ["PLAN_COMPONENT", "PLAN_FILE", "SHARD_COMPONENT", "Group", "SaveFailed", "Spooled", "active", "commit",
           "load", "rng_file", "save", "spool"]
