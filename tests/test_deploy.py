"""The container image and the EC2 Spot template: lint-clean, least privilege, and they actually run.

No Docker engine runs here, so the image's contract is checked in its text
(entrypoint, signals, user, health check) and its entrypoint command line is
run outside Docker: the `docker run ... IMAGE ARGS` line of the template's
user-data is rendered with test parameters, and `runner start ARGS` runs with
the environment file the user-data writes, against moto (S3 and autoscaling)
and the IMDS simulator, through a spot notice and a resume to the scale-down.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import PYTHON, ROOT, subprocess_env
from runner import health
from runner.sim.imds import ImdsSimulator
from runner.supervisor import scale_down

DOCKERFILE = Path(ROOT, "Dockerfile")
TEMPLATE = Path(ROOT, "deploy", "aws", "runner-spot.yaml")
BIN = Path(PYTHON).parent
STACK = "teststack"
GROUP = f"{STACK}-runner"


def _tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed: pip install -e '.[test]' (scripts/setup) installs it; CI runs this")
    return path


def _template() -> dict:
    from cfnlint.decode import decode

    template, matches = decode(str(TEMPLATE))
    assert not matches, matches
    return template


# -- lint ------------------------------------------------------------------------


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_template_is_cfn_lint_clean():
    result = subprocess.run([_tool("cfn-lint"), str(TEMPLATE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the image's contract ---------------------------------------------------------------


def _instructions() -> dict[str, list[str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.setdefault(word.upper(), []).append(rest.strip())
    return found


def test_dockerfile_runs_runner_start_under_tini_as_a_non_root_user():
    ins = _instructions()
    assert ins["ENTRYPOINT"] == ['["tini", "--", "runner", "start"]']  # no -g: only the supervisor gets SIGTERM
    assert ins["STOPSIGNAL"] == ["SIGTERM"]
    assert "runner.health" in ins["HEALTHCHECK"][0]
    assert ins["USER"][-1].split(":")[0] not in ("0", "root")
    assert all(re.match(r"\$\{PYTHON_IMAGE\}|python:3\.\d+-slim-\w+", f) for f in ins["FROM"])
    assert any("tini=" in run for run in ins["RUN"]), "tini is pinned to a Debian version"
    assert "--stop-timeout 120" in DOCKERFILE.read_text()


def test_constraints_pin_every_runtime_dependency():
    """The image installs with `-c constraints.txt`; a dependency missing there would float."""
    import importlib.metadata as md

    pins = {line.split("==")[0] for line in Path(ROOT, "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")}
    for raw in md.distribution("runner").requires or []:
        name = re.split(r"[\[<>=!~;\s]", raw, maxsplit=1)[0].lower().replace("_", "-")
        if "extra ==" not in raw:
            assert name in pins, f"{name} is not in constraints.txt: run scripts/constraints"


def test_health_check_sees_a_live_supervisor_and_not_a_stopped_one(tmp_path):
    def proc(pid: int, argv: list[str], state: str) -> None:
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (d / "stat").write_text(f"{pid} (runner (x)) {state} 1 1 1")

    proc(1, ["tini", "--", "runner", "start"], "S")  # tini's own command line is not the supervisor
    assert health.check(str(tmp_path))[0] is False
    proc(7, ["/opt/venv/bin/python3", "/opt/venv/bin/runner", "start", "--", "python", "t.py"], "T")
    healthy, why = health.check(str(tmp_path))
    assert not healthy and "state T" in why
    proc(8, ["python", "-m", "runner", "start", "--", "python", "t.py"], "S")
    assert health.check(str(tmp_path)) == (True, "runner start is running (pid 8)")
    assert health.main(["--proc", str(tmp_path)]) == 0


def test_sigterm_to_tini_reaches_runner_start_which_commits_an_emergency_snapshot(tmp_path):
    """`docker stop` signals PID 1 (tini); it must forward to the supervisor, which saves before stopping."""
    tini = shutil.which("tini")
    if tini is None:
        pytest.skip("tini is not installed (apt-get install tini); the image has it")
    from runner.checkpoint import RunReader
    from runner.storage import Store

    bucket = str(tmp_path / "bucket")
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
    argv = [tini, "-s", "--", PYTHON, "-m", "runner", "start", "--bucket", bucket, "--run-id", "t",
            "--notice-source", "none", "--grace-seconds", "30", "--", PYTHON, "-m", "runner.examples.voice",
            "--steps", "5000", "--step-sleep", "0.01", "--log-every", "10", "--save-every-steps", "1000"]
    instance = _Instance(argv, env, tmp_path / "instance")
    instance.pattern = re.compile(r"^step 20/")
    assert instance.seen.wait(60), "\n".join(instance.lines)
    instance.proc.send_signal(15)
    assert instance.finish() == 75, "\n".join(instance.lines)
    reasons = [m.reason.value for m in RunReader(Store(bucket), "t").valid_snapshots()]
    assert reasons and reasons[0] == "emergency", (reasons, "\n".join(instance.lines))


# -- least privilege ------------------------------------------------------------------


def _sub_text(value) -> str:
    """The template string of a `!Sub` (or a plain string)."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        return sub if isinstance(sub, str) else sub[0]
    assert isinstance(value, str), value
    return value


def _statements() -> list[dict]:
    role = _template()["Resources"]["InstanceRole"]["Properties"]
    return [s for policy in role["Policies"] for s in policy["PolicyDocument"]["Statement"]]


def _listify(value) -> list:
    return value if isinstance(value, list) else [value]


def test_iam_policy_names_only_the_runs_prefix():
    statements = _statements()
    bucket_arn = "arn:${AWS::Partition}:s3:::${BucketName}"
    run_prefix = "${RunPrefix}/${RunId}"
    s3 = [s for s in statements if any(a.startswith("s3:") for a in _listify(s["Action"]))]
    assert s3
    for statement in statements:
        assert statement["Effect"] == "Allow"
        for action in _listify(statement["Action"]):
            assert "*" not in action, f"wildcard action {action}"
    for statement in s3:
        resources = [_sub_text(r) for r in _listify(statement["Resource"])]
        actions = _listify(statement["Action"])
        if actions == ["s3:ListBucket"]:
            assert resources == [bucket_arn]
            condition = statement["Condition"]
            if "StringLike" in condition:  # the run's keys
                prefixes = [_sub_text(p) for p in _listify(condition["StringLike"]["s3:prefix"])]
                assert prefixes and all(p in (run_prefix, f"{run_prefix}/*") for p in prefixes), prefixes
            else:  # the bucket's top level only, one level deep
                assert condition == {"StringEquals": {"s3:prefix": "", "s3:delimiter": "/"}}
        else:
            assert resources == [f"{bucket_arn}/{run_prefix}/*"], resources
            assert set(actions) <= {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    star = {a for s in statements if _listify(s["Resource"]) == ["*"] for a in _listify(s["Action"])}
    assert star <= {"ec2:DescribeSpotPriceHistory", "pricing:GetProducts", "autoscaling:DescribeAutoScalingGroups"}
    assert {"ec2:DescribeSpotPriceHistory", "pricing:GetProducts"} <= star
    scaling = [s for s in statements if "autoscaling:SetDesiredCapacity" in _listify(s["Action"])]
    assert len(scaling) == 1
    assert [_sub_text(r) for r in _listify(scaling[0]["Resource"])] == [
        "arn:${AWS::Partition}:autoscaling:${AWS::Region}:${AWS::AccountId}:autoScalingGroup:*:"
        "autoScalingGroupName/${AWS::StackName}-runner"]
    group = _template()["Resources"]["Group"]["Properties"]
    assert _sub_text(group["AutoScalingGroupName"]) == "${AWS::StackName}-runner"


def test_launch_template_requires_imdsv2_with_a_hop_limit_for_containers():
    resources = _template()["Resources"]
    metadata = resources["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]
    assert metadata["HttpTokens"] == "required" and metadata["HttpPutResponseHopLimit"] == 2
    group = resources["Group"]["Properties"]
    assert group["CapacityRebalance"] is True
    policy = group["MixedInstancesPolicy"]
    assert policy["InstancesDistribution"]["SpotAllocationStrategy"] == "price-capacity-optimized"
    assert policy["InstancesDistribution"]["OnDemandPercentageAboveBaseCapacity"] == 0
    assert len(policy["LaunchTemplate"]["Overrides"]) >= 3
    rules = resources["Bucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
    assert any("AbortIncompleteMultipartUpload" in r for r in rules)


# -- the user-data's container command, run outside Docker ----------------------------------


def render_user_data(params: dict[str, str]) -> str:
    """The user-data script as CloudFormation's !Sub would render it."""
    sub = _template()["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]
    text = _sub_text(sub)
    values = {"AWS::StackName": STACK, "AWS::Region": "us-east-1", "AWS::Partition": "aws",
              "AWS::AccountId": "123456789012", **params}

    def replace(match: re.Match) -> str:
        if match.group(1).startswith("!"):
            return "${" + match.group(1)[1:] + "}"
        return values[match.group(1)]

    return re.sub(r"\$\{([^}]+)\}", replace, text)


def container_command(user_data: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(the --env-file's variables, docker's own args, the entrypoint's args) of the `docker run` line."""
    env_block = re.search(r"<<'ENV'\n(.*?)\nENV\n", user_data, re.S)
    assert env_block, "the user-data writes /etc/runner.env"
    env = dict(line.split("=", 1) for line in env_block.group(1).splitlines())
    runs = [line.strip() for line in user_data.splitlines() if line.strip().startswith("docker run") and "--name runner" in line]
    assert len(runs) == 1, runs
    argv = shlex.split(runs[0])
    at = argv.index("$IMAGE")
    return env, argv[:at], argv[at + 1:]


PARAMS = {"ImageUri": "runner:test", "BucketName": "", "RunPrefix": "runs", "RunId": "exp1",
          "TrainCommand": "python -m runner.examples.voice --steps 120 --step-sleep 0.02 --log-every 10",
          "SaveEverySteps": "50", "KeepLast": "3"}


def test_user_data_runs_the_container_with_the_stop_timeout_and_gpus():
    env, docker_args, args = container_command(render_user_data(dict(PARAMS, BucketName="b")))
    assert "--stop-timeout" in docker_args and docker_args[docker_args.index("--stop-timeout") + 1] == "120"
    assert "--gpus" in docker_args and "--restart" not in " ".join(docker_args)
    assert env["RUNNER_BUCKET"] == "s3://b/runs" and env["RUNNER_RUN_ID"] == "exp1"
    assert env["RUNNER_SCALE_DOWN_GROUP"] == GROUP
    assert args[0] == "--" and args[1:3] == ["python", "-m"]


def test_rendered_user_data_is_valid_bash_that_handles_every_exit_code(tmp_path):
    user_data = render_user_data(dict(PARAMS, BucketName="b"))
    script = tmp_path / "user-data.sh"
    script.write_text(user_data)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert user_data.startswith("#!/bin/bash\n")
    assert "shutdown -h now" in user_data.split("\n    75)")[1].split(";;")[0], "exit 75 terminates the instance"
    assert "runner.supervisor.scale_down" in user_data.split("\n    2)")[1].split(";;")[0], "exit 2 scales to zero"


def _make_group(endpoint: str) -> object:
    import boto3

    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1")
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    template = ec2.create_launch_template(LaunchTemplateName=f"lt-{time.monotonic_ns()}",
                                          LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "g5.xlarge"})
    client = boto3.client("autoscaling", endpoint_url=endpoint, region_name="us-east-1")
    client.create_auto_scaling_group(
        AutoScalingGroupName=GROUP, MinSize=0, MaxSize=1, DesiredCapacity=1, VPCZoneIdentifier=subnet,
        LaunchTemplate={"LaunchTemplateId": template["LaunchTemplate"]["LaunchTemplateId"], "Version": "$Latest"})
    return client


def _desired(client) -> int:
    return client.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]["DesiredCapacity"]


class _Instance:
    """`runner start ARGS` as the container would run it, output collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path):
        cwd.mkdir()
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.seen = threading.Event()
        self.pattern: re.Pattern | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if self.pattern is not None and self.pattern.search(line):
                self.seen.set()

    def finish(self, timeout: float = 90) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        return code


def test_user_data_container_command_survives_a_spot_notice_and_scales_the_group_to_zero(s3_bucket_url, s3_env, tmp_path):
    bucket = s3_bucket_url.split("/")[2]
    env_file, _, args = container_command(render_user_data(dict(PARAMS, BucketName=bucket)))
    group = _make_group(s3_env["AWS_ENDPOINT_URL"])
    base = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"  # `python` in the command is the image's venv
    argv = [PYTHON, "-m", "runner", "start", *args]
    with ImdsSimulator() as sim:
        env = {**base, **env_file, **s3_env, "RUNNER_IMDS_ENDPOINT": sim.url, "RUNNER_POLL_INTERVAL": "0.5"}
        first = _Instance(argv, env, tmp_path / "instance1")
        first.pattern = re.compile(r"^step 30/")
        assert first.seen.wait(60), "\n".join(first.lines)
        sim.schedule_spot_notice(0)
        assert first.finish() == 75, "\n".join(first.lines)
        assert _desired(group) == 1, "a preempted run keeps its group"
        sim.reset()
        second = _Instance(argv, env, tmp_path / "instance2")
        assert second.finish() == 0, "\n".join(second.lines)
    out = "\n".join(second.lines)
    assert re.search(r"voice: resuming at step [1-9]", out), out
    assert f"auto scaling group {GROUP} scaled to zero" in out
    assert _desired(group) == 0


# -- scale to zero ---------------------------------------------------------------------


def test_scale_down_sets_min_size_too_when_it_is_above_zero(s3_env):
    client = _make_group(s3_env["AWS_ENDPOINT_URL"])
    client.update_auto_scaling_group(AutoScalingGroupName=GROUP, MinSize=1)
    scale_down.scale_to_zero(GROUP, client)
    found = client.describe_auto_scaling_groups(AutoScalingGroupNames=[GROUP])["AutoScalingGroups"][0]
    assert (found["MinSize"], found["DesiredCapacity"]) == (0, 0)


def test_scale_down_of_an_unknown_group_says_so_and_never_fails_the_run(s3_env, caplog):
    with pytest.raises(scale_down.ScaleDownError, match="does not exist"):
        scale_down.scale_to_zero("nope")
    with caplog.at_level("ERROR", logger="runner.supervisor"):
        scale_down.after_run("nope", finished=True)  # logs, does not raise
    assert "by hand" in caplog.text
    assert scale_down.main(["nope"]) == 1 and scale_down.main([]) == 2


def test_scale_down_happens_only_when_the_run_finished(s3_env):
    client = _make_group(s3_env["AWS_ENDPOINT_URL"])
    scale_down.after_run(GROUP, finished=False)
    scale_down.after_run(None, finished=True)
    assert _desired(client) == 1
    assert scale_down.main([GROUP]) == 0
    assert _desired(client) == 0


def test_scale_down_group_flag_reads_its_environment_variable(monkeypatch):
    from runner.cli import build_parser

    monkeypatch.setenv("RUNNER_SCALE_DOWN_GROUP", GROUP)
    args = build_parser().parse_args(["start", "--bucket", "b", "--", "true"])
    assert args.scale_down_group == GROUP
