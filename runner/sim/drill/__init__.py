"""`runner drill`: does this training command resume exactly?  Measured, not assumed.

It runs the user's own command under `runner start` (real subprocesses, as
on a real instance) once straight (run `<prefix>-reference`) and once
interrupted K times (run `<prefix>-interrupted`), each interruption followed
by a fresh supervisor in a fresh, empty working directory (a new instance
with an empty disk, the same bucket and run id), then compares the two runs'
final snapshots file by file.  The interruptions:

- ``notice``: an EC2 spot interruption notice from a local metadata
  simulator (runner.sim.imds) that each instance's supervisor polls;
  it must commit an emergency snapshot and exit 75;
- ``sigterm``: a bare SIGTERM to the supervisor (what `docker stop` or an
  orchestrator sends); the same, within --grace-seconds;
- ``kill-upload``: the whole instance is SIGKILLed half-way through writing
  a snapshot's data files (vanish.py); nothing gets to clean up.

Modules: run.py (the drill and its plan), compare.py (final snapshots,
bitwise), report.py (the result), vanish.py (the kill-upload wrapper); one
instance is runner/sim/instance.py (also used by `runner demo`).  Rendering
is in runner/cli/terminal.py.  Nothing here imports torch until two files differ.
"""

from runner.sim.drill.report import ComponentResult, DrillReport, Interruption, RunResult
from runner.sim.drill.run import KINDS, DrillConfig, parse_kinds, run_drill

__all__ = ["KINDS", "ComponentResult", "DrillConfig", "DrillReport", "Interruption", "RunResult", "parse_kinds",
           "run_drill"]
