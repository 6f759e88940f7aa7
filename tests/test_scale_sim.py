"""benchmarks/scale_sim.py: the model behind docs/scale.md behaves as the doc says it does.

These test the model's arithmetic and the direction of its effects (more
nodes, a request limit, spreading, a bandwidth cap), not any figure of a real
store.  Small configurations keep the whole file to a few seconds.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from helpers import PYTHON, ROOT

SCRIPT = Path(ROOT, "benchmarks", "scale_sim.py")
MiB = 2**20


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("scale_sim", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_sim"] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("scale_sim", None)


def small(sim, **changes):
    """A job of a few thousand requests: fast to simulate, big enough to show the effects."""
    base = dict(gpus=8, params=2e9, tensors=100, trials=20, uploads=1)
    return sim.Config(**{**base, **changes})


def one_row(sim, cfg, nodes, name="t", seed=0):
    return sim.simulate(cfg, name, nodes, np.random.default_rng(seed))


# -- on paper ----------------------------------------------------------------------------


def test_bytes_per_node_and_per_rank_halve_when_the_nodes_double(sim):
    cfg = sim.Config()
    for nodes in (8, 16, 32, 64, 128):
        a, b = sim.snapshot_plan(cfg, nodes), sim.snapshot_plan(cfg, 2 * nodes)
        assert a.total_bytes == b.total_bytes == cfg.params * cfg.bytes_per_param
        assert a.node_bytes == pytest.approx(2 * b.node_bytes)
        assert a.rank_bytes == pytest.approx(2 * b.rank_bytes)
        if b.parts_per_rank >= cfg.concurrency:  # each node's link bounds the upload: its time halves too
            assert a.node_bytes / sim.node_throughput(cfg, a) == pytest.approx(
                2 * b.node_bytes / sim.node_throughput(cfg, b))


def test_s3fs_sends_one_put_below_two_parts_and_create_parts_complete_from_two_parts(sim):
    part = 16 * MiB
    assert sim.put_requests(1, part) == 1
    assert sim.put_requests(2 * part - 1, part) == 1
    assert sim.put_requests(2 * part, part) == 2 + 2
    assert sim.put_requests(100 * MiB, part) == 7 + 2  # ceil(100 / 16) parts
    assert sim.get_requests(100 * MiB, part) == 1 + 7  # HEAD + one ranged GET per part
    assert sim.get_requests(1000, part) == 1 + 1


def test_request_count_of_a_small_snapshot_matches_the_hand_count(sim):
    # 2 nodes x 2 ranks, 100 MiB per rank: each data object is create + 7 parts + complete = 9,
    # each RNG file 1 PUT; the plan (10 tensors x 4 ranks x 100 B = 4 kB) 1 PUT; the manifest 1 PUT.
    cfg = sim.Config(gpus=2, params=4 * 100 * MiB, bytes_per_param=1, tensors=10, plan_entry_bytes=100)
    plan = sim.snapshot_plan(cfg, 2)
    assert (plan.ranks, plan.rank_bytes, plan.plan_bytes) == (4, 100 * MiB, 4000)
    assert plan.parts_per_rank == 7
    assert plan.objects == 4 * 2 + 2
    assert plan.write_requests == 4 * (9 + 1) + 1 + 1


def test_the_sharding_plan_grows_with_tensors_times_ranks(sim):
    cfg = sim.Config()
    assert sim.snapshot_plan(cfg, 256).plan_bytes == pytest.approx(32 * sim.snapshot_plan(cfg, 8).plan_bytes)
    assert sim.snapshot_plan(cfg, 8).plan_bytes == cfg.tensors * 64 * cfg.plan_entry_bytes


def test_one_partition_caps_the_save_whatever_the_node_count(sim):
    """put-limit x part size is a bandwidth ceiling: the largest model that fits stops growing."""
    cfg = sim.Config()
    ceiling = cfg.budget_s * cfg.put_limit * cfg.part / cfg.bytes_per_param
    for nodes in (64, 256):
        assert sim.largest_model(cfg, nodes) < ceiling
    spread = replace(cfg, prefixes=16)
    assert sim.largest_model(spread, 256) > 2 * sim.largest_model(cfg, 256)


def test_a_job_wide_bandwidth_cap_stops_the_save_from_shrinking_with_more_nodes(sim):
    free, capped = sim.Config(), sim.Config(bucket_gbps=5.0)
    assert sim.paper_commit_s(free, 8) > 1.5 * sim.paper_commit_s(free, 32)
    assert sim.paper_commit_s(capped, 256) > sim.paper_commit_s(capped, 32)  # the plan grows, the upload does not shrink
    sizes = [sim.largest_model(capped, n) for n in (16, 64, 256)]
    assert max(sizes) < 1.25 * min(sizes)
    assert sim.largest_model(free, 64) > 3 * sim.largest_model(free, 16) / 2


def test_resharding_to_fewer_ranks_reads_about_two_objects_per_rank(sim):
    # 4 old ranks -> 3 new: each new third of a tensor meets two old quarters.
    assert sim.objects_touched(4, 3).tolist() == [2, 2, 2]
    assert sim.objects_touched(8, 8).tolist() == [1] * 8
    cfg = sim.Config(gpus=1)
    same, fewer = sim.restore_estimate(cfg, 4, 4), sim.restore_estimate(cfg, 4, 3)
    assert same.amplification_mean == pytest.approx(1.0)
    assert fewer.amplification_mean == pytest.approx(2 * 3 / 4)
    assert fewer.seconds > same.seconds


def test_every_rank_reading_the_whole_plan_costs_the_restore_more_as_ranks_grow(sim):
    cfg = sim.Config()
    small_job, large_job = sim.restore_estimate(cfg, 8, 7), sim.restore_estimate(cfg, 256, 255)
    assert large_job.plan_read_bytes == pytest.approx(32 * small_job.plan_read_bytes)
    assert large_job.plan_read_bytes > 0.5 * large_job.node_read_bytes


# -- simulated ---------------------------------------------------------------------------


def test_an_upload_over_the_partition_limit_is_throttled_and_spreading_removes_it(sim):
    # 32 ranks x 4 parts: ~190 write requests offered at ~1,000/s against 100/s on one partition.
    limited = small(sim, params=32 * 64 * MiB / 14, put_limit=100.0)
    plan = sim.snapshot_plan(limited, 4)
    assert sim.offered_rate(limited, plan) > 5 * limited.put_limit
    throttled = one_row(sim, limited, 4)
    spread = one_row(sim, replace(limited, prefixes=32), 4)
    assert throttled.throttled_per_save > 0
    assert throttled.sim_peak_rps <= limited.put_limit * (1 + limited.burst_s) + 1
    assert throttled.upload_p50_s >= (plan.write_requests - 2) / limited.put_limit - limited.burst_s
    assert spread.throttled_per_save == 0
    assert spread.upload_p50_s < throttled.upload_p50_s / 3
    assert throttled.p50_s > spread.p50_s


def test_under_a_bucket_cap_the_simulated_upload_does_not_shrink_with_nodes(sim):
    free, capped = small(sim), small(sim, bucket_gbps=1.0)
    assert one_row(sim, free, 8).upload_p50_s < one_row(sim, free, 2).upload_p50_s / 2
    a, b = one_row(sim, capped, 2), one_row(sim, capped, 8)
    assert b.upload_p50_s > 0.9 * a.upload_p50_s
    assert b.upload_p50_s == pytest.approx(capped.params * capped.bytes_per_param / (capped.bucket_gbps * 1e9), rel=0.3)


def test_simulation_and_paper_agree_when_nothing_is_throttled(sim):
    row = one_row(sim, small(sim, trials=100, uploads=2), 4)
    assert row.throttled_per_save == 0
    assert row.p50_s <= row.p99_s <= row.max_s
    assert row.p50_s == pytest.approx(row.paper_s, rel=0.25)
    assert row.missed == 0 and row.margin_p99_s == pytest.approx(small(sim).budget_s - row.p99_s)


def test_a_rank_out_of_retries_fails_the_save_and_the_table_says_so(sim):
    cfg = small(sim, put_limit=5.0, trials=3)
    row = one_row(sim, cfg, 2)
    assert row.failed_uploads == 1 and row.restarts_per_save > 0
    assert math.isinf(row.p99_s) and row.missed == row.trials
    text = sim.render(cfg, [row], {"t": cfg})
    assert " fail " in text
    assert "! t on 2 nodes: 1 of 1 uploads had a rank run out of retries" in text


def test_the_same_seed_gives_the_same_figures(sim):
    cfg = small(sim, put_limit=300.0)
    assert sim.run(cfg, {"a": cfg}) == sim.run(cfg, {"a": cfg})


# -- command line ------------------------------------------------------------------------


def test_csv_has_one_row_per_scenario_and_node_count_with_the_documented_columns(sim, tmp_path, capsys):
    out = tmp_path / "rows.csv"
    assert sim.main(["--nodes", "2,4", "--params", "1e9", "--trials", "5", "--uploads", "1",
                     "--scenarios", "base,spread", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    with out.open() as f:
        rows = list(csv.DictReader(f))
    names = [f.name for f in fields(sim.Row)]
    assert list(rows[0]) == names
    assert [(r["scenario"], r["nodes"]) for r in rows] == [("base", "2"), ("base", "4"), ("spread", "2"), ("spread", "4")]
    for name in names:
        if name not in ("scenario", "nodes", "ranks", "trials", "uploads", "missed"):
            assert name in sim.COLUMNS, f"{name} is not explained in COLUMNS"
    assert "Notice -> committed manifest" in printed and "columns: see --help" in printed


def test_help_explains_every_printed_column(sim):
    text = sim.build_parser().format_help()
    for header in ("GB/node", "MB/rank", "plan MB", "objects", "PUT+POST", "offered/s", "limit/s", "x limit",
                   "prep", "upload", "p50, p99, max", "paper", "margin", "missed", "peak/s", "503s", "restarts",
                   "max model", "amp mean", "GETs hot", "same N s"):
        assert header in text
    assert "--put-limit" in text and "per partitioned prefix" in text


@pytest.mark.parametrize("argv", [["--nodes", "1"], ["--trials", "2.5"], ["--scenarios", "nope"],
                                  ["--bucket-gbps", "-1"], ["--params", "x"], ["--no-such-flag"]])
def test_bad_flags_exit_2_with_one_line(sim, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        sim.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scale_sim.py: error: ")


def test_the_script_runs_as_a_command(tmp_path):
    bad = subprocess.run([PYTHON, str(SCRIPT), "--gpus", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--gpus" in bad.stderr
    unwritable = tmp_path / "missing" / "rows.csv"
    ok = subprocess.run([PYTHON, str(SCRIPT), "--nodes", "2", "--params", "1e9", "--trials", "3", "--uploads", "1",
                         "--scenarios", "base", "--csv", str(unwritable)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 1 and "Per snapshot" in ok.stdout
    assert ok.stderr.startswith("scale_sim.py: cannot write") and ok.stderr.count("\n") == 1
