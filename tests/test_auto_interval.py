"""`save_every_steps="auto"`: the Young/Daly interval from measured save costs and the run's interruption rate.

The formula and its clamps are checked as pure functions and on
`AutoInterval` with a fake clock; then a real Checkpointer trains a small
model whose save cost is controlled (a component whose `state_dict()`
sleeps) in a loop whose step time is controlled (a sleep), and the interval
it picks, the overhead it costs and its reaction to a dearer save are
checked against the formula on the values it measured.  Last, the rate on
the run's ledger reaches the child through a real `runner start`.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch

import runner
import tiny_training as tiny
from helpers import PYTHON, subprocess_env
from runner import control
from runner.checkpoint import interval
from runner.checkpoint.interval import AutoInterval, Mtbf, choose, estimate_mtbf, young_daly_s
from runner.checkpoint.manifest import Reason
from runner.checkpoint.reader import RunReader
from runner.checkpoint.settings import CheckpointSettings
from runner.cli import main
from runner.cost.interruptions import interruption_history
from runner.cost.ledger import LedgerWriter
from runner.errors import ConfigError
from runner.storage import Store

HOUR = 3600.0


# -- the formula, pure ----------------------------------------------------------------


def test_young_daly_is_the_square_root_of_twice_cost_times_mtbf():
    assert young_daly_s(2.0, HOUR) == pytest.approx(120.0)  # sqrt(2 * 2 * 3600)
    assert young_daly_s(0.5, 6 * HOUR) == pytest.approx(math.sqrt(21600.0))


def test_choose_rounds_up_to_steps_and_names_the_term_that_decided():
    mtbf = Mtbf(HOUR, "set")
    got = choose(cost_s=2.0, cost_high_s=2.0, commit_s=10.0, step_s=0.7, mtbf=mtbf)
    assert got.bound == "young-daly" and got.seconds == pytest.approx(120.0)
    assert got.steps == math.ceil(120.0 / 0.7) == 172
    assert got.floor_steps == math.ceil((2.0 / 0.035) / 0.7)  # the overhead clamp, above the commit


def test_the_overhead_clamp_keeps_stall_over_interval_at_most_3_5_percent():
    # A short MTBF: Young/Daly alone would save every 2 s for a 1 s stall (50 % overhead).
    got = choose(cost_s=1.0, cost_high_s=1.2, commit_s=0.0, step_s=0.25, mtbf=Mtbf(2.0, "set"))
    assert young_daly_s(1.0, 2.0) == pytest.approx(2.0)
    assert got.bound == "overhead" and got.seconds == pytest.approx(1.2 / 0.035)
    assert 1.2 / (got.steps * 0.25) <= 0.035  # the recent worst stall, over the interval in steps
    assert got.steps == got.floor_steps


def test_the_commit_clamp_keeps_one_save_in_flight():
    # A cheap stall but a slow upload: a shorter interval would only wait for the previous save.
    got = choose(cost_s=0.01, cost_high_s=0.01, commit_s=90.0, step_s=0.5, mtbf=Mtbf(HOUR, "set"))
    assert young_daly_s(0.01, HOUR) < 90.0 and 0.01 / 0.035 < 90.0
    assert got.bound == "commit" and got.steps == 180 == got.floor_steps


def test_the_mtbf_is_the_users_else_the_ledger_blended_with_the_prior_else_the_prior():
    assert estimate_mtbf(1800.0, (5, 10 * HOUR)) == Mtbf(1800.0, "set")
    assert estimate_mtbf(None, None) == Mtbf(interval.PRIOR_MTBF_S, "prior")
    assert interval.PRIOR_MTBF_S == 6 * HOUR
    # The prior counts as one interruption in 6 h: (exposure + prior) / (interruptions + 1).
    seen = estimate_mtbf(None, (3, 18 * HOUR))
    assert seen.source == "ledger" and seen.seconds == pytest.approx((18 + 6) * HOUR / 4)
    assert estimate_mtbf(None, (0, 0.0)).seconds == pytest.approx(6 * HOUR)  # no history: the prior
    assert estimate_mtbf(None, (0, 200 * HOUR)).seconds == pytest.approx(206 * HOUR)  # quiet for long: long
    assert estimate_mtbf(None, (100, 100 * HOUR)).seconds == pytest.approx(106 / 101 * HOUR)  # data decide


# -- AutoInterval on a fake clock ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _train(auto: AutoInterval, clock: Clock, steps: int, step_s: float, cost_s: float, first: int = 1,
           last_saved: int | None = None) -> tuple[list[int], int | None]:
    """Drive `auto` as the Checkpointer does; the steps it saved at, and the last one."""
    saved = []
    for step in range(first, first + steps):
        auto.tick()
        if auto.due(step, last_saved):
            clock.now += cost_s
            auto.saved(cost_s)
            saved.append(step)
            last_saved = step
        clock.now += step_s
    return saved, last_saved


def test_first_save_after_the_first_save_time_then_the_formula_then_hysteresis(caplog):
    clock = Clock()  # steps of 1/8 s: exact in binary, so the step counts below are exact
    with caplog.at_level(logging.INFO, logger="runner.checkpoint"):
        auto = AutoInterval(Mtbf(HOUR, "set"), first_save_s=60.0, clock=clock)
        saved, last = _train(auto, clock, 2000, step_s=0.125, cost_s=2.0)
    assert saved[0] == 481  # 480 steps of 0.125 s after the first tick: 60 s of training
    # Then every sqrt(2 * 2 * 3600) = 120 s = 960 steps, counted from the previous save.
    assert auto.steps == 960 and auto.choice.bound == "young-daly"
    assert saved == [481, 481 + 960]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("checkpoint interval: auto; the first save after 60 s of training")
    assert "MTBF 60.0 min (set)" in lines[0]
    assert lines[1].startswith("checkpoint interval: every 960 steps (2.0 min of training; Young/Daly")
    assert len(lines) == 2  # the same cost again changes nothing: no line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="runner.checkpoint"):
        saved, _ = _train(auto, clock, 3000, step_s=0.125, cost_s=2.6, first=2001, last_saved=last)  # +30 % cost
    # The median of the last five moved to 2.6 s: Young/Daly says 1095 steps (+14 %), within the
    # 20 % hysteresis, so the interval in force stays and nothing is logged.
    assert auto.choice.steps == math.ceil(math.sqrt(2 * 2.6 * HOUR) / 0.125) == 1095
    assert auto.steps == 960 and saved == [2401, 3361, 4321]
    assert [r.getMessage() for r in caplog.records] == []


def test_a_dearer_save_that_breaks_the_overhead_clamp_changes_the_interval_at_once(caplog):
    clock = Clock()
    auto = AutoInterval(Mtbf(2.0, "set"), first_save_s=1.0, clock=clock)  # Young/Daly is below the clamp
    saved, last = _train(auto, clock, 200, step_s=0.01, cost_s=0.02)
    assert auto.choice.bound == "overhead" and auto.steps == math.ceil(0.02 / 0.035 / 0.01) == 58
    with caplog.at_level(logging.INFO, logger="runner.checkpoint"):
        saved, _ = _train(auto, clock, 1000, step_s=0.01, cost_s=0.2, first=201, last_saved=last)
    # The first dear save already sets the interval: the recent worst stall bounds the overhead.
    assert auto.steps == math.ceil(0.2 / 0.035 / 0.01) == 572
    assert saved[1] - saved[0] == 572
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("checkpoint interval: 58 -> every 572 steps") and "held at 3.5% overhead" in line


def test_the_steps_that_saved_are_not_counted_as_training_time():
    clock = Clock()
    auto = AutoInterval(Mtbf(HOUR, "set"), first_save_s=1.0, clock=clock)
    saved, _ = _train(auto, clock, 500, step_s=0.125, cost_s=50.0)  # a stall 400 times a step
    assert saved == [9] and auto.choice.step_s == 0.125
    assert auto.trained_s == (499 - len(saved)) * 0.125  # the gaps after a save are left out


# -- the settings -------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("AUTO", "auto"), (" 25 ", 25), (7, 7)])
def test_save_every_steps_takes_a_number_or_auto(value, expected):
    assert CheckpointSettings(bucket="b", save_every_steps=value).save_every_steps == expected


@pytest.mark.parametrize("value", ["0", "-3", "often", "2.5", True])
def test_a_bad_interval_is_one_clear_line(tmp_path, value):
    with pytest.raises(ConfigError) as caught:
        runner.Checkpointer(str(tmp_path), "r", save_every_steps=value)
    message = str(caught.value)
    assert message.startswith("invalid save_every_steps") and "'auto'" in message and "\n" not in message


def test_from_env_reads_auto_the_mtbf_and_the_observed_interruptions(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(control.ENV_BUCKET, str(tmp_path))
    monkeypatch.setenv(control.ENV_SAVE_EVERY_STEPS, "auto")
    monkeypatch.setenv(control.ENV_OBSERVED_INTERRUPTIONS, control.encode_interruptions(2, 7200.0))
    settings = CheckpointSettings.from_env()
    assert (settings.save_every_steps, settings.observed_interruptions) == ("auto", (2, 7200.0))
    monkeypatch.setenv(control.ENV_INTERRUPTION_MTBF, "5400")
    with runner.Checkpointer.from_env(model=torch.nn.Linear(2, 2)) as ckpt:
        assert ckpt.auto_interval.mtbf == Mtbf(5400.0, "set")  # the user's wins over the ledger's
    monkeypatch.setenv(control.ENV_OBSERVED_INTERRUPTIONS, "garbage")
    with caplog.at_level(logging.WARNING, logger="runner.checkpoint"):
        assert CheckpointSettings.from_env().observed_interruptions is None
    assert "ignoring RUNNER_OBSERVED_INTERRUPTIONS='garbage'" in caplog.text


def test_a_fixed_interval_keeps_its_multiples(tmp_path):
    parts = tiny.build(seed=1)
    with runner.Checkpointer(str(tmp_path), "fixed", save_every_steps=4, keep_last=10, **parts.components()) as ckpt:
        assert ckpt.auto_interval is None
        ckpt.save(3)  # a manual save in between does not shift the periodic ones
        for step in range(4, 14):
            tiny.train_step(parts)
            ckpt.step(step)
    steps = sorted(m.step for m in RunReader(Store(str(tmp_path)), "fixed").valid_snapshots()
                   if m.reason is Reason.PERIODIC)
    assert steps == [4, 8, 12]


# -- a real Checkpointer, a controlled save cost and step time -----------------------------


class SlowState:
    """A component whose capture costs `seconds` (its state_dict sleeps): the controlled save cost."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.value = torch.zeros(16)

    def state_dict(self) -> dict:
        time.sleep(self.seconds)
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def _loop(ckpt: runner.Checkpointer, parts: tiny.Parts, step_s: float, until, first: int = 1,
          last: int | None = None) -> dict:
    """Train until `until(ckpt)`.

    Returns the step reached, the overhead (time inside ckpt.step() over all
    time, from the first save on: that one comes by its own rule), and each
    save as (step, steps since the previous save, the interval in force).
    """
    auto = ckpt.auto_interval
    inside = total = 0.0
    step, saves = first - 1, []
    while not until(ckpt):
        began = time.perf_counter()
        tiny.train_step(parts)
        time.sleep(step_s)
        step += 1
        counting, in_force, made = auto.steps is not None, auto.steps, auto.saves
        called = time.perf_counter()
        ckpt.step(step)
        ended = time.perf_counter()
        if counting:
            inside += ended - called
            total += ended - began
        if auto.saves > made:
            saves.append((step, None if last is None else step - last, in_force))
            last = step
    return {"step": step, "overhead": inside / total if total else 0.0, "saves": saves}


def _periodic_steps(bucket: str, run_id: str) -> list[int]:
    reader = RunReader(Store(bucket), run_id)
    return sorted(m.step for m in reader.valid_snapshots() if m.reason is Reason.PERIODIC)


def test_the_interval_follows_young_daly_on_the_measured_costs_and_the_overhead_stays_under_3_5_percent(
        tmp_path, monkeypatch):
    monkeypatch.setattr(interval, "FIRST_SAVE_S", 0.3)
    # Recomputed after each save only (not also every 200 steps), so that the interval in force
    # before a step is the one its decision used.
    monkeypatch.setattr(interval, "RECOMPUTE_EVERY_STEPS", 10**9)
    bucket, parts, slow = str(tmp_path), tiny.build(seed=2), SlowState(0.03)
    ckpt = runner.Checkpointer(bucket, "yd", save_every_steps="auto", interruption_mtbf_s=120.0, keep_last=20,
                               slow=slow, **parts.components())
    with ckpt:
        result = _loop(ckpt, parts, 0.005, lambda c: c.auto_interval.saves >= 5)
        ckpt.wait()
    auto = ckpt.auto_interval
    choice = auto.choice
    # What the formula says for what was measured ...
    assert choice.bound == "young-daly", choice
    assert choice.steps == math.ceil(math.sqrt(2 * choice.cost_s * 120.0) / choice.step_s)
    assert abs(auto.steps - choice.steps) <= interval.HYSTERESIS * auto.steps
    # ... and what was measured is the controlled cost and step time (generous bounds: a loaded machine).
    assert 0.03 <= choice.cost_s < 0.03 * 3 and 0.005 <= choice.step_s < 0.005 * 4
    ideal = math.sqrt(2 * 0.03 * 120.0) / 0.005  # 537 steps with nothing but the sleeps
    assert ideal / 4 < choice.steps < ideal * 1.8
    # Each save came the interval in force after the previous one, and each is a committed snapshot.
    saves = result["saves"]
    assert len(saves) == 5 and all(gap == in_force for _, gap, in_force in saves[1:]), saves
    assert _periodic_steps(bucket, "yd") == [step for step, _, _ in saves]
    assert result["overhead"] <= 0.035, result


def test_a_dearer_save_mid_run_changes_the_interval_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(interval, "FIRST_SAVE_S", 0.3)
    bucket, parts, slow = str(tmp_path), tiny.build(seed=3), SlowState(0.01)
    with caplog.at_level(logging.INFO, logger="runner.checkpoint"):
        ckpt = runner.Checkpointer(bucket, "dear", save_every_steps="auto", interruption_mtbf_s=2.0, keep_last=20,
                                   slow=slow, **parts.components())
        with ckpt:
            # Four saves: the first (its buffers allocated) is out of the last three the clamp looks at.
            first = _loop(ckpt, parts, 0.005, lambda c: c.auto_interval.saves >= 4)
            cheap = ckpt.auto_interval.steps
            assert ckpt.auto_interval.choice.bound == "overhead"  # a 2 s MTBF: Young/Daly is below the clamp
            slow.seconds = 0.1
            saves = ckpt.auto_interval.saves
            dear = _loop(ckpt, parts, 0.005, lambda c: c.auto_interval.saves >= saves + 2,
                         first=first["step"] + 1, last=first["saves"][-1][0])
    choice = ckpt.auto_interval.choice
    assert choice.bound == "overhead" and ckpt.auto_interval.steps >= choice.floor_steps
    assert ckpt.auto_interval.steps > 3 * cheap  # ten times the stall: several times the steps
    assert ckpt.auto_interval.steps >= math.ceil(0.1 / 0.035 / choice.step_s)
    # The first dear save came at the cheap interval; the next one at the new interval, at once.
    (_, gap, in_force), (_, next_gap, next_in_force) = dear["saves"]
    assert gap == in_force == cheap and next_gap == next_in_force
    assert next_in_force > 3 * cheap and next_in_force >= math.ceil(0.1 / 0.035 / choice.step_s)
    # (Evaluated again after that save, the interval may follow the clamp on: a loaded machine measured
    # a slower second dear save and moved 487 -> 494 steps, so the final value is checked above, not here.)
    changed = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"checkpoint interval: {cheap} ->")]
    assert len(changed) == 1 and "held at 3.5% overhead" in changed[0], caplog.text


def test_a_sharded_job_saves_when_rank_0_says_so(tmp_path):
    """The interval is measured on every rank; only rank 0 votes for a periodic save, and the vote is the job's."""
    parts = tiny.build(seed=4)
    ckpt = runner.Checkpointer(str(tmp_path), "job", save_every_steps="auto", **parts.components())
    votes, saved = [], []

    class Group:  # rank 1 of two; rank 0 wants a periodic save at step 3
        is_coordinator = False

        def agree(self, wish: int) -> int:
            votes.append(wish)
            return max(wish, 1 if len(votes) == 3 else 0)

    ckpt._group = Group()
    ckpt.auto_interval.first_save_s = 0.0  # due at once on this rank: it must not vote for it
    ckpt._save_sharded_async = lambda step, epoch, metrics: saved.append(step)
    for step in range(1, 5):
        assert ckpt.step(step) is False
    assert votes == [0, 0, 0, 0] and saved == [3]
    assert ckpt.auto_interval.saves == 1  # its own stall measured, for if it ever leads
    ckpt._group = None
    ckpt.close()


# -- the rate on the ledger, and runner start ---------------------------------------------


def _ledger(store: Store, run_id: str, now: float) -> None:
    """Three earlier attempts: preempted after a notice, preempted unsaved, vanished; 2 + 4 + 1 h."""
    first = LedgerWriter(store, run_id, attempt="20260101T000000000000-aaaaaa")
    first.write("start", {"step": 0, "heartbeat_s": 60}, at=now - 10 * HOUR, seq=0)
    first.write("emergency", {"step": 90, "committed": True}, at=now - 8 * HOUR - 10)
    first.write("end", {"reason": "preempted", "exit_code": 75, "step": 90}, at=now - 8 * HOUR)
    second = LedgerWriter(store, run_id, attempt="20260101T020000000000-bbbbbb")
    second.write("start", {"step": 90, "heartbeat_s": 60}, at=now - 8 * HOUR, seq=0)
    second.write("end", {"reason": "preempted-unsaved", "exit_code": 75, "step": 150}, at=now - 4 * HOUR)
    third = LedgerWriter(store, run_id, attempt="20260101T060000000000-cccccc")
    third.write("start", {"step": 150, "heartbeat_s": 60}, at=now - 4 * HOUR, seq=0)
    third.write("heartbeat", {"step": 170}, at=now - 3.5 * HOUR)
    third.write("heartbeat", {"step": 190}, at=now - 3 * HOUR)


def test_the_ledger_counts_interruptions_over_the_time_the_attempts_covered(tmp_path):
    store, now = Store(str(tmp_path)), time.time()
    _ledger(store, "r", now)
    finished = LedgerWriter(store, "r", attempt="20260101T070000000000-dddddd")  # overlaps the third; not counted
    finished.write("start", {"step": 190}, at=now - 3.5 * HOUR, seq=0)
    finished.write("end", {"reason": "finished", "exit_code": 0, "step": 200}, at=now - 2 * HOUR)
    live = LedgerWriter(store, "r", attempt="20260101T080000000000-eeeeee")  # still running: not an interruption
    live.write("start", {"step": 200, "heartbeat_s": 60}, at=now - 1 * HOUR, seq=0)
    live.write("heartbeat", {"step": 210}, at=now - 30)
    history = interruption_history(store, "r", now=now)
    assert (history.interruptions, history.attempts) == (3, 5)
    assert history.exposure_s == pytest.approx(9 * HOUR - 30)  # 10 h ago to 2 h ago, then the last hour
    mine = interruption_history(store, "r", now=now, exclude={"20260101T080000000000-eeeeee"})
    assert mine.attempts == 4 and mine.exposure_s == pytest.approx(8 * HOUR)
    assert interruption_history(store, "nothing", now=now).attempts == 0


CHILD = r'''
import json, os
import torch
import runner

ckpt = runner.Checkpointer.from_env(model=torch.nn.Linear(2, 2))
mtbf = ckpt.auto_interval.mtbf
print("CHILD " + json.dumps({"observed": os.environ.get("RUNNER_OBSERVED_INTERRUPTIONS"),
                             "every": ckpt.settings.save_every_steps, "mtbf_s": mtbf.seconds,
                             "source": mtbf.source}), flush=True)
step = ckpt.restore()
ckpt.save(step + 1, final=True)
ckpt.close()
'''


def _runner_start(tmp_path: Path, bucket: str, run_id: str, *flags: str) -> tuple[dict, str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
    done = subprocess.run([PYTHON, "-m", "runner", "start", "--bucket", bucket, "--run-id", run_id,
                           "--notice-source", "none", "--save-every-steps", "auto", *flags, "--", PYTHON, str(script)],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("CHILD "))
    return json.loads(line[len("CHILD "):]), done.stderr


def test_runner_start_passes_the_ledgers_interruptions_to_the_child(tmp_path):
    bucket = str(tmp_path / "bucket")
    store, now = Store(bucket), time.time()
    _ledger(store, "spotty", now)
    seen, log = _runner_start(tmp_path, bucket, "spotty")
    count, exposure = control.decode_interruptions(seen["observed"])
    assert count == 3 and 7 * HOUR <= exposure < 7 * HOUR + 60  # plus this attempt's seconds so far
    assert seen["every"] == "auto" and seen["source"] == "ledger"
    assert seen["mtbf_s"] == pytest.approx((exposure + 6 * HOUR) / 4)  # about 3.25 h
    assert "3 interruption(s) in 7.0 h over 3 earlier attempt(s)" in log
    # The user's MTBF wins, and the ledger is not even counted then.
    seen, log = _runner_start(tmp_path, bucket, "spotty-2", "--interruption-mtbf", "5400")
    assert (seen["observed"], seen["source"], seen["mtbf_s"]) == (None, "set", 5400.0)
    assert "interruption(s)" not in log


def test_runner_start_refuses_a_bad_interval_in_one_line(tmp_path, capsys, monkeypatch):
    code = main(["start", "--bucket", str(tmp_path), "--save-every-steps", "often", "--", "true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("runner: error: invalid --save-every-steps:"), err
    assert "'auto'" in err[0]
    code = main(["start", "--bucket", str(tmp_path), "--save-every-steps", "auto", "--interruption-mtbf", "0",
                 "--", "true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("runner: error: invalid --interruption-mtbf:"), err
    monkeypatch.setenv("RUNNER_SAVE_EVERY_STEPS", "auto")
    code = main(["drill", "--bucket", str(tmp_path), "--", "true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "runner drill needs a fixed --save-every-steps" in err[0], err


def test_the_transformers_callback_refuses_auto_in_one_line(tmp_path):
    transformers = pytest.importorskip("runner.integrations.transformers")
    with pytest.raises(ConfigError, match=r"^save_every_steps='auto' is not supported by the Transformers callback"):
        transformers.RunnerCallback(str(tmp_path), "hf", save_every_steps="auto")
