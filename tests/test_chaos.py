"""The kill campaign's CI subset: ~30 seeded SIGKILLs of real `runner start` runs through a failing S3.

benchmarks/chaos.py owns the campaign (runs, kills, checks, table); this runs
a small seeded share of it and asserts what the campaign promises: no start
restores an invalid or older-than-newest snapshot, no committed snapshot that
retention must keep disappears, every finished run ends bitwise equal to the
uninterrupted one, and the buckets are clean after gc.  Set
RUNNER_TEST_CHAOS_SEED to explore other seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import chaos  # noqa: E402

SEED = int(os.environ.get("RUNNER_TEST_CHAOS_SEED", "20261203"))
TRIALS = 30


def test_thirty_random_kills_through_failing_s3_never_lose_or_mistrust_a_snapshot(tmp_path: Path) -> None:
    tally = chaos.campaign(SEED, TRIALS, fault_rate=0.06, jobs=2, two_rank_share=0.0, big_share=0.0,
                           work=tmp_path, time_limit=600)
    args = argparse.Namespace(seed=SEED, trials=TRIALS, fault_rate=0.06, jobs=2, two_rank_share=0.0, big_share=0.0)
    print(chaos.table(tally, args))
    assert tally.trials + tally.dropped == TRIALS, tally.problems  # a run that finished early drops its other kills
    assert tally.invalid_chosen == 0, tally.problems
    assert tally.not_newest == 0, tally.problems
    assert tally.committed_lost == 0, tally.problems
    assert tally.bitwise_mismatch == 0, tally.problems
    assert tally.hygiene_failures == 0, tally.problems
    assert tally.supervisor_misread == 0, tally.problems
    assert tally.problems == []
    assert tally.finished_runs + tally.finished_at_kill == tally.runs
    # The subset exercised what it claims: kills at writer phases and on held requests, and injected faults.
    assert sum(v for k, v in tally.kills.items() if k.startswith("fault:")) >= 5, tally.kills
    assert sum(v for k, v in tally.kills.items() if k.startswith("hold:")) >= 5, tally.kills
    assert sum(tally.faults.values()) >= 20, tally.faults
