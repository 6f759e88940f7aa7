"""Time from a termination notice to a committed emergency snapshot, under `runner start`.

Runs the real supervisor (`python -m runner start`) over a small training
child whose state is either small (two Linear layers + Adam, ~1.6 MB, the size
of the example voice model's state) or a ~500 MB state
(10 x Linear(2048, 2048) + Adam moments), sends SIGTERM to the supervisor
mid-training, and reads the supervisor's own log line "emergency snapshot ...
committed at step N, X s after the notice".  Also reports SIGTERM -> exit 75
and the supervisor's CPU use while the child trains (idle supervision).

    .venv/bin/python benchmarks/emergency_bench.py [--states small,500mb] [--targets local,s3]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

CHILD = textwrap.dedent('''
    import sys, time
    import torch
    import runner
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if sys.argv[1] == "500mb":
        model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(10)])
        batch = lambda: torch.randn(8, 2048)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))
        batch = lambda: torch.randn(8, 256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    ckpt = runner.Checkpointer.from_env(model=model, optimizer=opt)
    step = ckpt.restore()
    while True:
        loss = model(batch()).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        step += 1
        print(f"step {step}", flush=True)
        if ckpt.step(step):
            break
        time.sleep(0.05)
    ckpt.close()
''')


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(state: str, bucket: str, env: dict[str, str], work: Path) -> dict[str, float]:
    script = work / "child.py"
    script.write_text(CHILD)
    cmd = [sys.executable, "-m", "runner", "start", "--bucket", bucket, "--run-id", f"em-{state}",
           "--save-every-steps", "1000000", "--notice-source", "none", "--grace-seconds", "110",
           "--", sys.executable, str(script), state]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until training runs
        lines.append(line)
        if line.startswith("step 5"):
            break
    cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
    for line in proc.stdout:
        lines.append(line)
        if time.monotonic() - t0 > 10:
            break
    idle_cpu = (_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    lines.extend(proc.stdout)
    code = proc.wait()
    exit_s = time.monotonic() - sent
    text = "".join(lines)
    match = re.search(r"emergency snapshot \S+ committed at step \d+, ([\d.]+) s after the notice", text)
    if code != 75 or not match:
        raise SystemExit(f"unexpected outcome (exit {code}):\n{text[-3000:]}")
    return {"notice_to_commit_s": float(match.group(1)), "sigterm_to_exit_s": exit_s, "supervisor_cpu_pct": 100 * idle_cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", default="small,500mb")
    parser.add_argument("--targets", default="local,s3")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    server = None
    if "s3" in args.targets:
        import boto3
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        env.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x",
                   AWS_DEFAULT_REGION="us-east-1")
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="x", aws_secret_access_key="x",
                     region_name="us-east-1").create_bucket(Bucket="bench")
    print(f"{'state':8} {'target':6} {'notice->commit (s)':>19} {'SIGTERM->exit 75 (s)':>21} {'supervisor CPU %':>17}")
    try:
        for state in args.states.split(","):
            for target in args.targets.split(","):
                with tempfile.TemporaryDirectory() as tmp:
                    work = Path(tmp)
                    bucket = str(work / "bucket") if target == "local" else "s3://bench/runs"
                    r = run_case(state, bucket, env, work)
                    print(f"{state:8} {target:6} {r['notice_to_commit_s']:>19.2f} {r['sigterm_to_exit_s']:>21.2f} "
                          f"{r['supervisor_cpu_pct']:>17.2f}", flush=True)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
