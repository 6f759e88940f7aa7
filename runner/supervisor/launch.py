"""The command line of each child start: the user's command, or torchrun around it.

Owns the translation of `--nproc-per-node`, `--nnodes` and `--rdzv-endpoint`
into `python -m torch.distributed.run ...` (torchrun's own module, run by the
interpreter the user named, so that the job gets the same environment).  The
command is built again for every start: a multi-node job needs a fresh
rendezvous id each time, because torchrun closes an id for good when a job
ends (runner/rendezvous.py says why and how the nodes agree on the next one).

A single machine uses torchrun's `--standalone` rendezvous.  Several machines
use the c10d backend at the endpoint, as clients only (`is_host=false`: the
store is `runner rendezvous`, which outlives every node), and wait up to
30 minutes for the group to be whole (`join_timeout`): a replacement spot
node must boot and pull the image first.
"""

from __future__ import annotations

import sys

from runner.supervisor.config import StartConfig, is_python

JOIN_TIMEOUT_S = 1800


def multi_node(config: StartConfig) -> bool:
    """True when the job may span several machines (one supervisor each)."""
    return config.torchrun and config.max_nodes > 1


def child_command(config: StartConfig, rdzv_id: str | None = None) -> list[str]:
    """The argv of the next child, for the rendezvous id `rdzv_id` (asked of the store when not given).

    Raises rendezvous.RendezvousUnavailable when the store cannot be asked.
    """
    if not config.torchrun:
        return list(config.command)
    command = list(config.command)
    if is_python(command[0]):
        # `python train.py ARGS` -> torchrun ... train.py ARGS; `python -m pkg ARGS` -> torchrun ... -m pkg ARGS.
        python, target = command[0], command[1:]
        prefix: list[str] = []
    else:
        python, target = sys.executable, command
        prefix = ["--no-python"]  # torchrun runs a non-Python command as it is
    args = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(config.nproc_per_node or 1),
            "--nnodes", config.nnodes or "1"]
    if config.rdzv_endpoint is None:
        args.append("--standalone")
    else:
        if rdzv_id is None:
            from runner.rendezvous import rendezvous_id

            rdzv_id = rendezvous_id(config.rdzv_endpoint, config.run_id)
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", config.rdzv_endpoint, "--rdzv-id", rdzv_id,
                 "--rdzv-conf", f"is_host=false,join_timeout={JOIN_TIMEOUT_S}"]
    return args + prefix + target
