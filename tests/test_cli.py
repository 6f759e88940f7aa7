"""The `runner` command line: output, exit codes, one-line errors, RUNNER_* defaults.

Most cases call `runner.cli.main([...])` in-process; the exit-code and stderr
cases run `python -m runner ...` as real subprocesses (all started at once,
so the module stays fast) against a local folder, the moto S3 server, and a
dead endpoint.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from helpers import PYTHON, subprocess_env
from runner import Checkpointer
from runner.checkpoint import layout
from runner.checkpoint.reader import RunReader
from runner.cli import main
from runner.storage import Store
from test_operations import corrupt, make_run

SNAPSHOT_FIELDS = {"snapshot_id", "step", "epoch", "reason", "created_at", "size_bytes", "files", "valid", "problem",
                   "pinned", "final", "parent", "forked_from"}
UNKNOWN_ID = "000000000009-20200101T000000-abcdef"


@pytest.fixture(autouse=True)
def _quiet_moto(monkeypatch):
    """The in-process moto server logs every request to stderr, which these tests read."""
    monkeypatch.setattr(logging.getLogger("werkzeug"), "disabled", True)


@pytest.fixture(autouse=True)
def _no_runner_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("RUNNER_"):
            monkeypatch.delenv(key)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ids(url: str, run_id: str = "exp1") -> list[str]:
    return RunReader(Store(url), run_id).snapshot_ids()


# -- ls -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_ls_shows_runs_and_snapshots_as_tables_and_json(backend, tmp_path, request, capsys):
    url = str(tmp_path) if backend == "local" else request.getfixturevalue("s3_bucket_url")
    make_run(url, "exp1", steps=(1, 2), final=True)
    make_run(url, "exp2", steps=(7,))

    code, out, err = run(capsys, "ls", "--bucket", url)
    assert code == 0 and "exp1" in out and "exp2" in out and "Traceback" not in err

    code, out, _ = run(capsys, "ls", "--bucket", url, "--json")
    runs = {r["run_id"]: r for r in json.loads(out)}
    assert (runs["exp1"]["snapshots"], runs["exp1"]["newest_step"], runs["exp1"]["final"]) == (2, 2, True)
    assert runs["exp2"]["newest_step"] == 7

    code, out, _ = run(capsys, "ls", "--bucket", url, "--run-id", "exp1")
    assert code == 0 and all(sid in out for sid in ids(url))

    code, out, _ = run(capsys, "ls", "--bucket", url, "--run-id", "exp1", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["step"] for r in rows] == [2, 1]
    assert set(rows[0]) == SNAPSHOT_FIELDS
    assert rows[0]["final"] and rows[0]["reason"] == "final" and rows[0]["valid"] and rows[0]["problem"] is None
    assert rows[0]["parent"] == rows[1]["snapshot_id"] and rows[0]["size_bytes"] > 0


def test_ls_with_no_runs(tmp_path, capsys):
    code, out, _ = run(capsys, "ls", "--bucket", str(tmp_path))
    assert code == 0 and "no runs" in out
    code, out, _ = run(capsys, "ls", "--bucket", str(tmp_path), "--json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = run(capsys, "ls", "--bucket", str(tmp_path), "--run-id", "ghost", "--json")
    assert code == 0 and json.loads(out) == []


def test_ls_marks_an_invalid_snapshot_and_logs_nothing_to_stdout(tmp_path, capsys):
    url = str(tmp_path)
    make_run(url, steps=(1, 2))
    newest = ids(url)[0]
    Store(url).delete([layout.data_key("exp1", newest, "model.pt")])
    code, out, _ = run(capsys, "ls", "--bucket", url, "--run-id", "exp1", "--json")
    rows = json.loads(out)
    assert code == 0 and rows[0]["valid"] is False and "model.pt is missing" in rows[0]["problem"]


# -- verify ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_verify_clean_then_after_a_flipped_byte(backend, tmp_path, request, capsys):
    url = str(tmp_path) if backend == "local" else request.getfixturevalue("s3_bucket_url")
    make_run(url, steps=(1, 2))
    code, out, err = run(capsys, "verify", "--bucket", url, "--run-id", "exp1")
    assert code == 0 and out.count(" ok ") == 2 and err == ""

    newest = ids(url)[0]
    corrupt(url, newest, "model.pt")
    code, out, err = run(capsys, "verify", "--bucket", url, "--run-id", "exp1", "--json")
    report = json.loads(out)  # stdout holds JSON only: no progress, no logs
    assert code == 1 and report["valid"] is False
    assert report["snapshots"][0]["problems"] == ["model.pt does not match its checksum"]
    assert report["snapshots"][1]["valid"] is True
    assert err.count("\n") == 1 and err.startswith("runner: error: ") and "model.pt" in err


def test_verify_a_truncated_file_and_a_single_snapshot(tmp_path, capsys):
    url = str(tmp_path)
    make_run(url, steps=(1, 2))
    newest, oldest = ids(url)
    corrupt(url, newest, "optimizer.pt", truncate=True)
    code, out, err = run(capsys, "verify", "--bucket", url, "--run-id", "exp1", "--snapshot", newest)
    assert code == 1 and "optimizer.pt has" in out and "optimizer.pt" in err
    code, _, _ = run(capsys, "verify", "--bucket", url, "--run-id", "exp1", "--snapshot", oldest)
    assert code == 0


# -- gc and pin -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_gc_dry_run_lists_then_gc_keeps_newest_k_and_pinned(backend, tmp_path, request, capsys):
    url = str(tmp_path) if backend == "local" else request.getfixturevalue("s3_bucket_url")
    make_run(url, steps=(1, 2, 3, 4))
    s4, s3, s2, s1 = ids(url)

    code, out, _ = run(capsys, "pin", "--bucket", url, "--run-id", "exp1", s1)
    assert code == 0 and f"pinned {s1}" in out

    code, out, _ = run(capsys, "gc", "--bucket", url, "--run-id", "exp1", "--keep-last", "2", "--dry-run")
    assert code == 0 and f"would delete snapshot {s2}" in out and s3 not in out.split("kept")[0]
    assert "dry run" in out and ids(url) == [s4, s3, s2, s1]

    code, out, err = run(capsys, "gc", "--bucket", url, "--run-id", "exp1", "--keep-last", "2", "--json")
    report = json.loads(out)
    assert code == 0 and [d["snapshot_id"] for d in report["deleted"]] == [s2]
    assert report["kept"] == [s4, s3, s1] and report["pinned"] == [s1]
    assert ids(url) == [s4, s3, s1]

    code, out, _ = run(capsys, "pin", "--bucket", url, "--run-id", "exp1", "--unpin", s1)
    assert code == 0 and f"unpinned {s1}" in out
    code, _, err = run(capsys, "gc", "--bucket", url, "--run-id", "exp1", "--keep-last", "1")
    assert code == 0 and ids(url) == [s4]
    assert "retention: deleted snapshot" in err  # INFO logs reach stderr by default


def test_pin_latest_and_refusing_an_invalid_snapshot(tmp_path, capsys):
    url = str(tmp_path)
    make_run(url, steps=(1, 2))
    newest, oldest = ids(url)
    code, out, _ = run(capsys, "pin", "--bucket", url, "--run-id", "exp1", "latest", "--json")
    assert code == 0 and json.loads(out) == {"snapshot_id": newest, "pinned": True, "changed": True}
    Store(url).delete([layout.data_key("exp1", oldest, "model.pt")])
    code, out, err = run(capsys, "pin", "--bucket", url, "--run-id", "exp1", oldest)
    assert code == 1 and out == "" and err.startswith("runner: error: ") and "not valid" in err


def test_gc_sweeps_old_orphans_and_keeps_young_ones(tmp_path, capsys):
    url = str(tmp_path)
    make_run(url, steps=(1,))
    store = Store(url)
    old, young = layout.new_snapshot_id(7), layout.new_snapshot_id(8)
    for sid in (old, young):
        store.write_bytes(layout.data_key("exp1", sid, "model.pt"), b"partial")
    os.utime(os.path.join(url, layout.data_key("exp1", old, "model.pt")), (1e9, 1e9))
    code, out, _ = run(capsys, "gc", "--bucket", url, "--run-id", "exp1", "--orphan-age", "600")
    assert code == 0 and f"deleted orphaned data {old}" in out and young not in out
    assert store.list(layout.data_prefix("exp1", young)) and not store.list(layout.data_prefix("exp1", old))


# -- fork -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_fork_copies_and_the_forked_run_restores_with_lineage(backend, tmp_path, request, capsys):
    url = str(tmp_path) if backend == "local" else request.getfixturevalue("s3_bucket_url")
    source = make_run(url, steps=(1, 2))
    newest, oldest = ids(url)

    code, out, _ = run(capsys, "fork", "--bucket", url, "--from", f"exp1@{oldest}", "--to", "exp2")
    assert code == 0 and f"forked exp1@{oldest} into run exp2" in out
    code, out, _ = run(capsys, "fork", "--bucket", url, "--from", "exp1", "--to", "exp3", "--json")
    assert code == 0 and json.loads(out)["forked_from"] == f"exp1@{newest}"

    code, out, _ = run(capsys, "ls", "--bucket", url, "--run-id", "exp3", "--json")
    (row,) = json.loads(out)
    assert row["forked_from"] == f"exp1@{newest}" and row["parent"] is None and row["step"] == 2

    model = torch.nn.Linear(4, 2)
    ckpt = Checkpointer(url, "exp3", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        async_save=False)
    assert ckpt.restore() == 2
    ckpt.close()
    assert torch.equal(model.weight, source.weight) and torch.equal(model.bias, source.bias)

    code, _, err = run(capsys, "fork", "--bucket", url, "--from", "exp1", "--to", "exp3")
    assert code == 1 and "already has snapshots" in err and err.count("\n") == 1


# -- RUNNER_* defaults, help, start, imds-sim -------------------------------------------


def test_flags_default_from_runner_environment_variables(tmp_path, capsys, monkeypatch):
    url = str(tmp_path)
    make_run(url, "exp9", steps=(1, 2, 3))
    monkeypatch.setenv("RUNNER_BUCKET", url)
    monkeypatch.setenv("RUNNER_RUN_ID", "exp9")
    monkeypatch.setenv("RUNNER_KEEP_LAST", "1")
    monkeypatch.setenv("RUNNER_DRY_RUN", "true")
    monkeypatch.setenv("RUNNER_JSON", "1")
    code, out, _ = run(capsys, "gc")
    report = json.loads(out)
    assert code == 0 and report["dry_run"] and len(report["deleted"]) == 2
    code, out, _ = run(capsys, "gc", "--keep-last", "2")  # a flag beats its variable
    assert len(json.loads(out)["deleted"]) == 1

    monkeypatch.setenv("RUNNER_DRY_RUN", "perhaps")
    code, _, err = run(capsys, "gc")
    assert code == 2 and err.startswith("runner: error: RUNNER_DRY_RUN")


def test_every_command_has_help_with_an_example(capsys):
    for command in ("start", "ls", "verify", "gc", "pin", "fork"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and "example:" in out and "exit codes:" in out and "RUNNER_" in out
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "imds-sim" in out


def test_start_builds_the_config_from_flags_and_environment(tmp_path, capsys, monkeypatch):
    supervisor = pytest.importorskip("runner.supervisor.run")
    seen = []
    monkeypatch.setattr(supervisor, "supervise", lambda config: seen.append(config) or 75)
    monkeypatch.setenv("RUNNER_GRACE_SECONDS", "10")
    monkeypatch.setenv("RUNNER_STORAGE_OPTION", "a=1,b.c=x")
    code = main(["start", "--bucket", str(tmp_path), "--run-id", "exp1", "--keep-last", "5",
                 "--notice-source", "none", "--storage-option", "d=true",
                 "--", "python", "train.py", "--lr", "3e-4"])
    (config,) = seen
    assert code == 75
    assert config.command == ["python", "train.py", "--lr", "3e-4"]
    assert (config.run_id, config.keep_last, config.grace_seconds, config.notice_source) == ("exp1", 5, 10.0, "none")
    assert config.storage_options == {"a": 1, "b": {"c": "x"}, "d": True}
    assert config.save_every_steps == 100  # StartConfig's own default

    code, _, err = run(capsys, "start", "--bucket", str(tmp_path), "--notice-source", "carrier-pigeon", "--", "x")
    assert code == 2 and err.startswith("runner: error: invalid --notice-source") and err.count("\n") == 1
    code, _, err = run(capsys, "start", "--bucket", str(tmp_path))
    assert code == 2 and "no training command" in err


def test_imds_sim_is_delegated_and_its_absence_is_one_line(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        main(["imds-sim", "--help"])
    assert exit_.value.code == 0 and "imds-sim" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "runner.sim.imds", None)
    code, _, err = run(capsys, "imds-sim", "--port", "0")
    assert code == 1 and err.startswith("runner: error: the IMDS simulator is not available") and err.count("\n") == 1


# -- exit codes and one-line errors ---------------------------------------------


def assert_one_line_error(code: int, err: str, expected_code: int, words: str) -> None:
    lines = err.splitlines()
    assert code == expected_code, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("runner: error: "), err
    assert words in lines[0]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(("AWS_", "RUNNER_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module", autouse=True)
def cli_runs(moto_endpoint, tmp_path_factory) -> Iterator[dict[str, subprocess.Popen]]:
    """The bad-store cases as real `python -m runner ...` subprocesses.

    Started once, before the module's first test, so that their interpreter
    start-up and the endpoint's retries overlap with the in-process tests.
    """
    root = tmp_path_factory.mktemp("cli")
    empty = root / "empty"
    empty.write_text("")
    s3 = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
              AWS_ENDPOINT_URL=moto_endpoint)
    no_credentials = dict(AWS_CONFIG_FILE=str(empty), AWS_SHARED_CREDENTIALS_FILE=str(empty),
                          AWS_EC2_METADATA_DISABLED="true", AWS_REGION="us-east-1", AWS_ENDPOINT_URL=moto_endpoint)
    cases = {
        "unknown-scheme": (["ls", "--bucket", "nosuchscheme://b/runs"], {}),
        "missing-bucket": (["ls", "--bucket", "s3://no-such-bucket-4711/runs"], s3),
        "unreachable": (["ls", "--bucket", "s3://b/runs"], dict(s3, AWS_ENDPOINT_URL="http://127.0.0.1:1")),
        "no-credentials": (["ls", "--bucket", "s3://b/runs"], no_credentials),
    }
    procs = {name: subprocess.Popen([PYTHON, "-m", "runner", *argv], env=_clean_env(**extra), cwd=root,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, extra) in cases.items()}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("case, code, words", [
    ("unknown-scheme", 2, "nosuchscheme"),
    ("missing-bucket", 1, "does not exist"),
    ("unreachable", 1, "cannot reach"),
    ("no-credentials", 1, "no credentials"),
])
def test_a_subprocess_fails_with_one_line_and_the_documented_exit_code(cli_runs, case, code, words):
    _, stderr = cli_runs[case].communicate(timeout=180)
    assert_one_line_error(cli_runs[case].returncode, stderr, code, words)


@pytest.mark.parametrize("argv, code, words", [
    (["ls", "--storage-option", "novalue"], 2, "--storage-option"),
    (["ls", "--run-id", "exp1", "--storage-option", "auto_mkdir=true", "--storage-option", "x"], 2, "'x'"),
    (["pin", "--run-id", "exp1", "yesterday"], 2, "not a snapshot id"),
    (["ls", "--run-id", "../etc"], 2, "run id"),
    (["fork", "--from", "exp1@nope", "--to", "exp2"], 2, "not a snapshot id"),
    (["gc", "--run-id", "exp1", "--keep-last", "0"], 2, "--keep-last"),
    (["report", "--run-id", "exp1", "--price-per-hour", "-1"], 2, "--price-per-hour"),
    (["report", "--run-id", "exp1", "--on-demand-price-per-hour", "nan"], 2, "--on-demand-price-per-hour"),
    (["verify", "--run-id", "exp1", "--snapshot", UNKNOWN_ID], 1, UNKNOWN_ID),
    (["pin", "--run-id", "exp1", UNKNOWN_ID], 1, UNKNOWN_ID),
    (["verify", "--run-id", "ghost"], 1, "has no snapshots"),
    (["fork", "--from", "ghost", "--to", "exp2"], 1, "no intact snapshot"),
    (["verify", "--run-id", "exp1"], 1, "model.pt does not match its checksum"),
])
def test_bad_input_fails_with_one_line_and_the_documented_exit_code(argv, code, words, tmp_path, capsys):
    url = str(tmp_path)
    make_run(url, steps=(1,))
    corrupt(url, ids(url)[0])
    got, _, err = run(capsys, *argv, "--bucket", url)
    assert_one_line_error(got, err, code, words)


def test_a_local_bucket_that_does_not_exist(tmp_path, capsys):
    got, _, err = run(capsys, "ls", "--bucket", str(tmp_path / "typo"))
    assert_one_line_error(got, err, 1, "does not exist")
    assert not (tmp_path / "typo").exists()


def test_start_flags_for_seconds_fields_name_the_flag_in_errors(capsys):
    """Fields in seconds (`*_s`) are --flags without the suffix, in help and in errors."""
    from runner import cli

    for argv, flag in ((["--sync-settle", "-1"], "--sync-settle"), (["--restart-backoff", "-1"], "--restart-backoff"),
                       (["--lease-ttl", "1"], "--lease-ttl"), (["--crash-loop-limit", "0"], "--crash-loop-limit")):
        code = cli.main(["start", "--bucket", "/tmp/unused-bucket", *argv, "--", "true"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"runner: error: invalid {flag}:"), err
