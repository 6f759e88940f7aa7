"""`runner start -- torchrun ...` (the user's own torchrun command): every worker stops, one sharded snapshot.

tests/test_distributed.py covers the `--nproc-per-node` shorthand, resharding and multi-node.
"""

from __future__ import annotations

import re
import signal
import textwrap

from supervisor_harness import RUN, start, supervisors  # noqa: F401 (fixture)

from helpers import PYTHON
from runner.checkpoint import RunReader
from runner.checkpoint.manifest import Reason
from runner.storage import Store, clear_caches

WORKER = textwrap.dedent('''
    import os, sys, time
    import torch
    import torch.distributed as dist
    import runner

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    ckpt = runner.Checkpointer.from_env(model=model)
    step = ckpt.restore()
    print(f"rank {rank} ready", flush=True)
    while step < 10_000:
        time.sleep(0.05)
        step += 1
        if ckpt.step(step):
            print(f"rank {rank} got the stop request at step {step}", flush=True)
            break
    ckpt.close()
    dist.destroy_process_group()
''')


def test_every_torchrun_worker_gets_the_stop_request(tmp_path, supervisors):  # noqa: F811
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    bucket = str(tmp_path / "bucket")
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    sup = start(supervisors, tmp_path, bucket, [], name="torchrun", command=command, grace_seconds=20)
    sup.wait_for(r"rank 0 ready", timeout=90)
    sup.wait_for(r"rank 1 ready", timeout=30)
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.finish(timeout=60) == 75, sup.output
    stops = dict(re.findall(r"rank (\d) got the stop request at step (\d+)", sup.output))
    assert stops.keys() == {"0", "1"} and len(set(stops.values())) == 1, sup.output  # one step, every rank
    clear_caches()
    saved = RunReader(Store(bucket), RUN).newest_valid()
    assert saved is not None and saved.reason is Reason.EMERGENCY, sup.output
    assert (saved.layout, saved.world_size, str(saved.step)) == ("sharded", 2, stops["0"])
