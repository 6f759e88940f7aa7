"""`runner start -- torchrun ...`: a stop request reaches every worker of the job."""

from __future__ import annotations

import re
import signal
import textwrap

from supervisor_harness import start, supervisors  # noqa: F401 (fixture)

from helpers import PYTHON

WORKER = textwrap.dedent('''
    import os, sys, time
    import torch
    import runner

    rank = int(os.environ["RANK"])
    torch.manual_seed(rank)
    model = torch.nn.Linear(4, 4)
    # Each rank saves into a run of its own here: sharded snapshots of one run are torch.distributed.checkpoint's job.
    os.environ["RUNNER_RUN_ID"] = os.environ["RUNNER_RUN_ID"] + f"-rank{rank}"
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
    ranks = {int(m) for m in re.findall(r"rank (\d) got the stop request", sup.output)}
    assert ranks == {0, 1}, sup.output
