"""The README's main job: train the example voice model, interrupt it, resume it.

It runs `python -m runner.examples.voice` as a real child process against a
local bucket folder, asks it to save and stop part-way (SIGUSR1, the same
request the supervisor sends on a spot notice), then starts a fresh process
in an empty working directory that resumes from the newest valid snapshot and
finishes.  It ends with the run's snapshots and whether the resumed run ended
bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runner import control


def _voice(bucket: Path, run_id: str, steps: int, save_every: int, fingerprint: Path, cwd: Path,
           extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "runner.examples.voice", "--bucket", str(bucket), "--run-id", run_id,
           "--steps", str(steps), "--save-every-steps", str(save_every), "--fingerprint-out", str(fingerprint), *extra]
    env = dict(os.environ)
    env.pop(control.ENV_RESUME, None)
    return subprocess.Popen(cmd, cwd=cwd, env=env)


def _fingerprint(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runner-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", default="runner-bucket", help="local bucket folder (default: ./runner-bucket)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every-steps", type=int, default=50)
    parser.add_argument("--interrupt-after", type=float, default=None,
                        help="seconds before the save-and-stop request (default: about 40%% of the run)")
    args = parser.parse_args(argv)

    bucket = Path(args.bucket).resolve()
    run_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    work = Path(tempfile.mkdtemp(prefix="runner-demo-"))
    try:
        print(f"== uninterrupted reference run ({args.steps} steps)", flush=True)
        ref_dir = work / "reference"
        ref_dir.mkdir()
        started = time.monotonic()
        ref = _voice(work / "ref-bucket", "reference", args.steps, args.save_every_steps, work / "ref.json", ref_dir, [])
        if ref.wait() != 0:
            print("the reference run failed", file=sys.stderr)
            return 1
        duration = time.monotonic() - started

        delay = args.interrupt_after if args.interrupt_after is not None else 0.4 * duration
        print(f"== run {run_id}: training, then a save-and-stop request after {delay:.1f} s", flush=True)
        first_dir = work / "instance-1"
        first_dir.mkdir()
        first = _voice(bucket, run_id, args.steps, args.save_every_steps, work / "first.json", first_dir, [])
        time.sleep(delay)
        if first.poll() is None:
            first.send_signal(signal.SIGUSR1)
        first.wait()
        shutil.rmtree(first_dir)  # the instance is gone: nothing local survives

        print("== a new instance with an empty disk resumes the run", flush=True)
        second_dir = work / "instance-2"
        second_dir.mkdir()
        second = _voice(bucket, run_id, args.steps, args.save_every_steps, work / "second.json", second_dir, [])
        if second.wait() != 0:
            print("the resumed run failed", file=sys.stderr)
            return 1

        ref_fp, resumed_fp = _fingerprint(work / "ref.json"), _fingerprint(work / "second.json")
        same = bool(ref_fp) and {k: ref_fp[k] for k in ("params_sha256", "optimizer_sha256")} == {
            k: resumed_fp.get(k) for k in ("params_sha256", "optimizer_sha256")}
        print(f"== snapshots of {run_id} in {bucket}:", flush=True)
        subprocess.run([sys.executable, "-m", "runner", "ls", "--bucket", str(bucket), "--run-id", run_id], check=False)
        print(f"final state identical to the uninterrupted run: {'yes' if same else 'NO'}")
        return 0 if same else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
