"""The ranks of a sharded job: their own gloo group, the names of the shared files, the state dicts DCP sees.

The ranks talk over a gloo group of their own (`Group`), whatever backend the
training uses: its collectives are on small CPU objects, once per step for
the stop flag and a few times per save.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from runner.errors import ConfigError
from runner.storage import StorageError

log = logging.getLogger("runner.checkpoint")


_LEASE_LOST = "lease lost: "
PLAN_FILE = "dcp-plan.json"
PLAN_COMPONENT = "_plan"
SHARD_COMPONENT = "_shard"


def rng_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def active() -> bool:
    """True in a torch.distributed job (torchrun, any world size): saves are sharded."""
    return dist.is_available() and dist.is_initialized()


class SaveFailed(StorageError):
    """A sharded save that some rank could not complete (raised on every rank)."""


class Group:
    """This job's ranks, over a gloo group of our own, created collectively (every rank builds one).

    Outside a torch.distributed job (`Group(local=True)`) it is one rank, and
    DCP runs without collectives: a plain process can restore a sharded snapshot.
    """

    def __init__(self, local: bool = False) -> None:
        self.local = local
        self.rank = 0 if local else dist.get_rank()
        self.world_size = 1 if local else dist.get_world_size()
        self.pg = None if local else dist.new_group(backend="gloo")
        # A commit runs on the writer thread while training goes on, so its collectives need a group of
        # their own: a group's collectives must come in the same order on every rank, and step()'s votes
        # on the training thread would interleave with them.
        self.commit_pg = None if local else dist.new_group(backend="gloo")

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def agree(self, wish: int) -> int:
        """The largest `wish` of any rank (the step-boundary vote: go on, periodic save, save, save and stop)."""
        if self.local:
            return wish
        flag = torch.tensor([wish], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.pg)
        return int(flag.item())

    def broadcast(self, value: Any, commit: bool = False) -> Any:
        """Rank 0's `value` on every rank (between our own ranks: pickle is theirs, not the bucket's).

        `commit`: over the commit group (the writer thread's), not the training thread's.
        """
        if self.local:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.commit_pg if commit else self.pg)
        return box[0]

    def all_gather(self, value: Any, commit: bool = False) -> list[Any]:
        if self.local:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.commit_pg if commit else self.pg)
        return out

    def close(self) -> None:
        """Release our gloo groups: left to the interpreter's exit, their threads can abort the process."""
        for pg in (self.pg, self.commit_pg):
            if pg is not None and dist.is_initialized():
                dist.destroy_process_group(pg)
        self.pg = self.commit_pg = None


def owners_of(components: Mapping[str, Any]) -> dict[str, torch.nn.Module]:
    """For every optimizer component, the module component holding its parameters."""
    modules = [m for m in components.values() if isinstance(m, torch.nn.Module)]
    owners: dict[str, torch.nn.Module] = {}
    for name, obj in components.items():
        if isinstance(obj, torch.optim.Optimizer):
            params = {id(p) for group in obj.param_groups for p in group["params"]}
            owner = next((m for m in modules if params <= {id(p) for p in m.parameters()}), None)
            if owner is None:
                raise ConfigError(f"component {name!r}: its parameters are not all in one module component; "
                                  "pass the model too, so a sharded snapshot can name them")
            owners[name] = owner
    return owners


def state_dicts(components: Mapping[str, Any], owners: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, obj in components.items():
        if isinstance(obj, torch.nn.Module):
            out[name] = get_model_state_dict(obj)
        elif name in owners:
            out[name] = get_optimizer_state_dict(owners[name], obj)
        else:
            out[name] = obj.state_dict()
    return out


def load_state_dicts(components: Mapping[str, Any], owners: Mapping[str, torch.nn.Module],
                      loaded: Mapping[str, Any], strict: bool) -> None:
    options = StateDictOptions(strict=strict)
    for name, obj in components.items():
        if name not in loaded:
            continue
        if isinstance(obj, torch.nn.Module):
            set_model_state_dict(obj, loaded[name], options=options)
        elif name in owners:
            set_optimizer_state_dict(owners[name], obj, loaded[name], options=options)
        else:
            obj.load_state_dict(loaded[name])
