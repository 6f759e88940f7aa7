"""Training stall per save of the Transformers integration, next to the Trainer's own save to local disk.

Runs tests/transformers_train.py (a GPT-2 built from a config, CPU, real
Trainer with RunnerCallback) against a local folder and against moto S3, and
stops it with SIGUSR1 (the supervisor's stop request) at step `--stop-at`, so
that one run has periodic saves and one emergency save.  The callback times
each save in its own process (printed by the script as `child: saves [...]`):
- trainer local save: from the end of `on_step_end` to `on_save`, which is
  the Trainer writing `checkpoint-N/` to local disk (what a plain Trainer
  user pays; it blocks);
- runner stall: the training thread's time in runner for that save (periodic:
  listing the folder and handing it to the writer thread, plus any wait for
  the previous upload; emergency: the whole synchronous publish and commit).

    .venv/bin/python benchmarks/transformers_bench.py [--n-embd 256] [--n-layer 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _moto import MotoS3  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "transformers_train.py")


def run_once(bucket: str, a: argparse.Namespace) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env.update(RUNNER_BUCKET=bucket, RUNNER_RUN_ID="bench", RUNNER_KEEP_LAST="3", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    with tempfile.TemporaryDirectory() as work:
        child = subprocess.Popen([sys.executable, SCRIPT, "--steps", str(a.steps), "--save-steps", str(a.save_steps),
                                  "--n-embd", str(a.n_embd), "--n-layer", str(a.n_layer), "--save-total-limit", "2"],
                                 cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = []
        for line in child.stdout:  # type: ignore[union-attr]
            out.append(line)
            if line.startswith(f"loss {a.stop_at} "):
                child.send_signal(signal.SIGUSR1)
        child.wait()
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(work) for f in fs
                   if "checkpoint-" in d) / max(1, len([d for d in os.listdir(os.path.join(work, "out"))]))
    saves = re.search(r"child: saves (.*)$", "".join(out), re.M)
    if child.returncode != 0 or saves is None:
        sys.exit("the training script failed:\n" + "".join(out[-30:]))
    print(f"  checkpoint folder about {size / 2**20:.1f} MiB")
    return json.loads(saves.group(1))


def report(name: str, saves: list[dict]) -> None:
    for reason in ("periodic", "emergency"):
        rows = [s for s in saves if s["reason"] == reason and s["trainer_save_s"] is not None]
        if rows:
            trainer = statistics.median(s["trainer_save_s"] for s in rows)
            stall = statistics.median(s["stall_s"] for s in rows)
            print(f"  {name:6} {reason:9} n={len(rows)}  trainer local save {trainer * 1000:8.1f} ms   "
                  f"runner stall {stall * 1000:8.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-steps", type=int, default=5)
    p.add_argument("--stop-at", type=int, default=32)
    a = p.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    with tempfile.TemporaryDirectory() as local:
        print("local folder:")
        report("local", run_once(os.path.join(local, "bucket"), a))
    with MotoS3() as s3:
        print("moto S3:")
        report("s3", run_once(f"s3://{s3.new_bucket()}/runs", a))


if __name__ == "__main__":
    main()
