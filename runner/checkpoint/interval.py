"""The automatic checkpoint interval, `save_every_steps="auto"` (DESIGN.md 5).

Owns the formula, its clamps, the interruption rate it uses, and
`AutoInterval`, which the Checkpointer feeds with step times and save costs
and asks "is a periodic save due?".  No I/O here but one log line (logger
`runner.checkpoint`) when the interval changes.

Why these choices:

- Young/Daly.  With a save that costs C seconds of training and failures
  every M seconds on average (MTBF), the expected waste per second of
  training is C/T (saving) + T/(2M) (work redone after a failure, half an
  interval on average); it is smallest at T = sqrt(2 C M).  The curve is
  flat near its optimum: an interval off by a factor k wastes
  (k + 1/k) / 2 times the least, so an MTBF off by 4x (an interval off by
  2x) costs 25 % more than the best choice.  That is why a prior MTBF is
  good enough to start with.
- Clamps.  T is never shorter than C / 3.5 % (the steady overhead target of
  DESIGN.md 5, CheckFreq's), and never shorter than the time an async save
  takes to commit in the background: only one save is in flight, so a
  shorter interval only makes the next save wait for the previous one.  For
  the overhead clamp C is the largest of the last three saves, so that one
  slow save does not push the overhead over the target before the median
  catches up; Young/Daly itself uses the median of the last five.
- C is what training lost to the save: the time `Checkpointer.step()` spent
  in it.  For an async save that is the copy to host memory (plus any wait
  for the previous save still in flight, which is a real stall too); for a
  synchronous or sharded save it is the whole save.
- Steps.  T is turned into steps with the median time between `step()`
  calls over the last 512 steps, leaving out the steps that saved (their
  time is the stall, not training).  Rounded up, so the overhead bound
  holds in steps too.  A long window, because step times jitter (data
  loading, a busy host) and the interval in steps should not.
- Hysteresis.  The interval in force changes only when the freshly computed
  one differs by more than 20 %, or when it has fallen below a clamp (the
  overhead or the commit time would be exceeded); a change of more than
  20 % is one log line (a small rise that only keeps a clamp is logged at
  debug level).  It is computed again after every periodic save and every
  200 steps (the step time may change: evaluation, longer sequences).
- Sharded jobs.  Every rank must save at the same step, and each rank's
  measurements differ a little; rank 0's decision is the job's, carried to
  the others by the Checkpointer's step-boundary vote (no extra collective).
- The first save.  Before any save there is no measured C, so the first
  periodic save comes after 60 s of training (`FIRST_SAVE_S`): soon enough
  that a store that refuses writes (credentials, permissions) shows within
  the first minute and not after hours, and that little is at risk before
  the first snapshot; late enough for the warm-up steps (allocator, data
  loader workers, autotuning) to be over.  Its cost is the first measure;
  the interval adapts from there.  A resumed process measures again (the
  costs of the previous instance need not be this one's).
- The MTBF.  In this order: the user's (`interruption_mtbf_s=`,
  `runner start --interruption-mtbf`, RUNNER_INTERRUPTION_MTBF); else the
  run's own history, which the supervisor counts on the cost ledger
  (interruptions over the attempts' time, RUNNER_OBSERVED_INTERRUPTIONS:
  runner/cost/interruptions.py) and which is blended with the prior as a
  gamma prior worth one interruption in `PRIOR_MTBF_S`:
  MTBF = (exposure + prior) / (interruptions + 1), so that a short history
  moves the estimate a little and a long one decides it; else the prior.
- The prior, 6 hours, is a prior and not a measurement.  AWS's Spot
  Instance Advisor publishes each instance type's "frequency of
  interruption" as the share of capacity Spot reclaimed over the trailing
  month, in buckets <5 %, 5-10 %, 10-15 %, 15-20 % and >20 %.  Read as a
  steady hazard, even the top bucket is about one interruption per 3,200
  instance-hours; but the buckets are monthly averages over a region, the
  top one is open-ended, GPU pools often sit in it, and they are reclaimed
  in bursts: DESIGN.md's users see "several times a day".  M also counts
  every failure that loses the work since the last save, not only
  reclaims: crashes, OOM kills, an instance gone without a notice.  So the
  prior leans short, which is cheap (the flat curve above, and the
  overhead clamp bounds what a too-short interval costs).  With a notice
  that arrives, the emergency snapshot already saves the work; periodic
  saves are for the failures a notice does not cover, so counting every
  reclaim as a failure is on the safe side.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("runner.checkpoint")

MAX_OVERHEAD = 0.035  # steady checkpoint overhead, a fraction of training time (DESIGN.md 5)
PRIOR_MTBF_S = 6 * 3600.0  # see the module notes: a prior, replaced by the run's ledger as it grows
FIRST_SAVE_S = 60.0  # training seconds before the first periodic save, which measures the save cost
HYSTERESIS = 0.2  # the interval in force changes when the computed one differs by more than this
RECOMPUTE_EVERY_STEPS = 200
_STEP_WINDOW = 512
_COST_WINDOW = 5
_HIGH_WINDOW = 3


@dataclass(frozen=True)
class Mtbf:
    """Mean time between failures, in seconds, and where it came from."""

    seconds: float
    source: str  # "set", "ledger" or "prior"
    interruptions: int = 0
    exposure_s: float = 0.0

    def describe(self) -> str:
        if self.source == "ledger":
            return (f"MTBF {duration(self.seconds)} (this run's ledger: {self.interruptions} interruption(s) in "
                    f"{duration(self.exposure_s)}, with the {duration(PRIOR_MTBF_S)} prior)")
        return f"MTBF {duration(self.seconds)} ({'set' if self.source == 'set' else 'prior: no history of this run'})"


def duration(seconds: float) -> str:
    """`42 s`, `12.5 min`, `6.0 h`: for log lines."""
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_mtbf(set_s: float | None = None, observed: tuple[int, float] | None = None,
                  prior_s: float = PRIOR_MTBF_S) -> Mtbf:
    """The MTBF to use: the user's, else the run's history blended with the prior, else the prior."""
    if set_s is not None:
        return Mtbf(float(set_s), "set")
    if observed is not None:
        count, exposure = observed
        return Mtbf((exposure + prior_s) / (count + 1), "ledger", count, exposure)
    return Mtbf(prior_s, "prior")


def young_daly_s(cost_s: float, mtbf_s: float) -> float:
    """The interval, in seconds of training, that wastes least: sqrt(2 C M)."""
    return math.sqrt(2.0 * max(cost_s, 0.0) * mtbf_s)


@dataclass(frozen=True)
class Choice:
    """One computed interval and what it came from."""

    steps: int
    seconds: float  # the interval in training time, before rounding to steps
    bound: str  # which term decided it: "young-daly", "overhead" or "commit"
    floor_steps: int  # fewer steps than this would break a clamp
    cost_s: float
    commit_s: float
    step_s: float
    mtbf: Mtbf

    def describe(self) -> str:
        why = {"young-daly": "Young/Daly sqrt(2 x stall x MTBF)",
               "overhead": f"held at {MAX_OVERHEAD:.1%} overhead",
               "commit": "no shorter than a background commit"}[self.bound]
        return (f"every {self.steps} steps ({duration(self.seconds)} of training; {why}): save stall {self.cost_s:.3f} s, "
                f"commit {self.commit_s:.2f} s, step {self.step_s * 1000:.1f} ms, {self.mtbf.describe()}")


def choose(cost_s: float, cost_high_s: float, commit_s: float, step_s: float, mtbf: Mtbf,
           max_overhead: float = MAX_OVERHEAD) -> Choice:
    """The interval for a save stall `cost_s` (median), `cost_high_s` (recent worst), a commit time and step time."""
    step_s = max(step_s, 1e-6)
    terms = {"young-daly": young_daly_s(cost_s, mtbf.seconds), "overhead": cost_high_s / max_overhead,
             "commit": commit_s}
    bound = max(terms, key=lambda k: terms[k])
    seconds = terms[bound]
    floor_steps = max(1, math.ceil(max(terms["overhead"], terms["commit"]) / step_s))
    return Choice(steps=max(1, math.ceil(seconds / step_s)), seconds=seconds, bound=bound, floor_steps=floor_steps,
                  cost_s=cost_s, commit_s=commit_s, step_s=step_s, mtbf=mtbf)


class AutoInterval:
    """The interval in force for one process: fed step ticks and save costs, asked whether a save is due.

    `tick()` at every step boundary, `saved(stall_s)` after each periodic save
    made at one, `committed(seconds)` when a background commit finished (any
    thread), `interrupted()` after any other save.  `steps` is None until
    the first periodic save was measured.
    """

    def __init__(self, mtbf: Mtbf, *, max_overhead: float = MAX_OVERHEAD, first_save_s: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.mtbf = mtbf
        self.max_overhead = max_overhead
        self.first_save_s = FIRST_SAVE_S if first_save_s is None else first_save_s
        self.clock = clock
        self.steps: int | None = None
        self.choice: Choice | None = None
        self.saves = 0  # periodic saves measured
        self.changes = 0  # how often the interval in force changed
        self.trained_s = 0.0  # training time seen (the saving steps left out)
        self._last_tick: float | None = None
        self._skip_gap = False
        self._since_check = 0
        self._gaps: deque[float] = deque(maxlen=_STEP_WINDOW)
        self._costs: deque[float] = deque(maxlen=_COST_WINDOW)
        self._commits: deque[float] = deque(maxlen=_COST_WINDOW)  # appended by the writer thread
        self._lock = threading.Lock()
        log.info("checkpoint interval: auto; the first save after %s of training measures its cost, then "
                 "Young/Daly with %s", duration(self.first_save_s), mtbf.describe())

    def tick(self) -> None:
        """A step boundary (the start of `Checkpointer.step()`)."""
        now = self.clock()
        if self._last_tick is not None and not self._skip_gap:
            gap = now - self._last_tick
            self._gaps.append(gap)
            self.trained_s += gap
        self._skip_gap = False
        self._last_tick = now
        self._since_check += 1
        if self.steps is not None and self._since_check >= RECOMPUTE_EVERY_STEPS:
            self._update()

    def due(self, step: int, last_saved_step: int | None) -> bool:
        if self.steps is None:
            return self.trained_s >= self.first_save_s
        return step - (last_saved_step or 0) >= self.steps

    def saved(self, stall_s: float) -> None:
        """A periodic save stalled training `stall_s` seconds at this step."""
        self._costs.append(max(0.0, stall_s))
        self.saves += 1
        self._skip_gap = True
        self._update()

    def committed(self, seconds: float) -> None:
        """A periodic save finished committing in the background after `seconds`."""
        with self._lock:
            self._commits.append(max(0.0, seconds))

    def interrupted(self) -> None:
        """Another save (emergency, manual, final) ran: this step's time is not a training step's."""
        self._skip_gap = True

    def _update(self) -> None:
        self._since_check = 0
        if not self._costs or not self._gaps:
            return
        costs = list(self._costs)
        with self._lock:
            commits = list(self._commits)
        choice = choose(statistics.median(costs), max(costs[-_HIGH_WINDOW:]),
                        statistics.median(commits) if commits else 0.0, statistics.median(self._gaps),
                        self.mtbf, self.max_overhead)
        self.choice = choice
        old = self.steps
        if old is not None and old >= choice.floor_steps and abs(choice.steps - old) <= HYSTERESIS * old:
            return
        self.steps = choice.steps
        self.changes += 1
        if old is None:
            log.info("checkpoint interval: %s", choice.describe())
        else:  # a small rise that only keeps a clamp is not worth a line
            big = abs(choice.steps - old) > HYSTERESIS * old
            log.log(logging.INFO if big else logging.DEBUG, "checkpoint interval: %d -> %s", old, choice.describe())
