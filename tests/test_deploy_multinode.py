"""The multi-node EC2 Spot template: lint-clean, least privilege, the network torchrun needs, a user-data that runs.

The training nodes keep every convention of deploy/aws/runner-spot.yaml (its
tests, in test_deploy.py, cover those in depth): the same role, IMDSv2 with a
hop limit for the container, the same exit-code loop.  What is new is checked
here: the on-demand rendezvous instance and its endpoint in the nodes'
user-data, the security groups, the group sized by NodeCount, one instance
family with NprocPerNode GPUs, and exit 76 (another node was preempted), on
which a node starts again at once without counting a failure.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
from pathlib import Path

from helpers import ROOT
from test_deploy import PARAMS, STACK, _listify, _sub_text, _tool, container_command
from test_deploy import render_user_data as render_single_node_user_data

TEMPLATE = Path(ROOT, "deploy", "aws", "runner-spot-multinode.yaml")
SINGLE = Path(ROOT, "deploy", "aws", "runner-spot.yaml")
MULTI_PARAMS = dict(PARAMS, BucketName="b", TrainCommand="python train.py --lr 3e-4", NodeCount="3",
                    NprocPerNode="4", RendezvousPort="29400", RendezvousIp="10.0.0.5")


def _decode(path: Path) -> dict:
    from cfnlint.decode import decode

    template, matches = decode(str(path))
    assert not matches, matches
    return template


def _resources() -> dict:
    return _decode(TEMPLATE)["Resources"]


def _render(sub) -> str:
    """A `!Sub` (string or [string, variables]) as CloudFormation would render it with MULTI_PARAMS."""
    values = {"AWS::StackName": STACK, "AWS::Region": "us-east-1", "AWS::Partition": "aws",
              "AWS::AccountId": "123456789012", **MULTI_PARAMS}

    def replace(match: re.Match) -> str:
        if match.group(1).startswith("!"):
            return "${" + match.group(1)[1:] + "}"
        return values[match.group(1)]

    return re.sub(r"\$\{([^}]+)\}", replace, _sub_text(sub))


def _node_user_data() -> str:
    data = _resources()["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]
    return _render(data)


def _store_user_data() -> str:
    return _render(_resources()["RendezvousInstance"]["Properties"]["UserData"]["Fn::Base64"])


# -- lint ----------------------------------------------------------------------------------


def test_template_is_cfn_lint_clean():
    result = subprocess.run([_tool("cfn-lint"), str(TEMPLATE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -- least privilege -------------------------------------------------------------------------


def test_nodes_have_the_single_node_role_and_the_store_can_only_pull_the_image():
    resources = _resources()
    assert resources["InstanceRole"] == _decode(SINGLE)["Resources"]["InstanceRole"]
    store_role = resources["RendezvousRole"]["Properties"]
    assert "Policies" not in store_role
    assert [_sub_text(a) for a in store_role["ManagedPolicyArns"]] == [
        "arn:${AWS::Partition}:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly"]
    profile = resources["RendezvousInstance"]["Properties"]["IamInstanceProfile"]
    assert profile == {"Ref": "RendezvousInstanceProfile"}
    assert resources["RendezvousInstanceProfile"]["Properties"]["Roles"] == [{"Ref": "RendezvousRole"}]


def test_iam_policy_names_only_the_runs_prefix():
    role = _resources()["InstanceRole"]["Properties"]
    statements = [s for policy in role["Policies"] for s in policy["PolicyDocument"]["Statement"]]
    bucket_arn = "arn:${AWS::Partition}:s3:::${BucketName}"
    s3 = [s for s in statements if any(a.startswith("s3:") for a in _listify(s["Action"]))]
    assert s3
    for statement in statements:
        assert statement["Effect"] == "Allow"
        assert not any("*" in a for a in _listify(statement["Action"]))
    for statement in s3:
        resources = [_sub_text(r) for r in _listify(statement["Resource"])]
        assert resources in ([bucket_arn], [f"{bucket_arn}/${{RunPrefix}}/${{RunId}}/*"]), resources
        if resources == [bucket_arn]:
            assert _listify(statement["Action"]) == ["s3:ListBucket"] and statement["Condition"]


def test_both_launch_templates_require_imdsv2():
    resources = _resources()
    nodes = resources["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]
    assert nodes["HttpTokens"] == "required" and nodes["HttpPutResponseHopLimit"] == 2  # the container's hop
    store = resources["RendezvousLaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]
    assert store["HttpTokens"] == "required" and store["HttpPutResponseHopLimit"] == 1
    assert resources["RendezvousInstance"]["Properties"]["LaunchTemplate"]["LaunchTemplateId"] == {
        "Ref": "RendezvousLaunchTemplate"}


# -- network ------------------------------------------------------------------------------------


def test_nodes_talk_to_each_other_on_all_tcp_and_to_the_store_on_its_port_only():
    resources = _resources()
    node_sg = {"Ref": "NodeSecurityGroup"}
    assert "SecurityGroupIngress" not in resources["NodeSecurityGroup"]["Properties"]
    ingress = [r["Properties"] for r in resources.values() if r["Type"] == "AWS::EC2::SecurityGroupIngress"]
    assert ingress == [{"GroupId": node_sg, "SourceSecurityGroupId": node_sg, "IpProtocol": "tcp",
                        "FromPort": 0, "ToPort": 65535, "Description": ingress[0]["Description"]}]
    store_in = resources["RendezvousSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert len(store_in) == 1
    assert store_in[0]["SourceSecurityGroupId"] == node_sg and store_in[0]["IpProtocol"] == "tcp"
    assert store_in[0]["FromPort"] == store_in[0]["ToPort"] == {"Ref": "RendezvousPort"}
    assert not any("CidrIp" in rule or "CidrIpv6" in rule for rule in store_in)
    launch = resources["LaunchTemplate"]["Properties"]["LaunchTemplateData"]
    assert launch["SecurityGroupIds"] == [node_sg]
    assert resources["RendezvousInstance"]["Properties"]["SecurityGroupIds"] == [{"Ref": "RendezvousSecurityGroup"}]
    assert _decode(TEMPLATE)["Parameters"]["RendezvousPort"]["Default"] == 29400


def test_the_placement_group_is_optional_and_cluster():
    resources = _resources()
    assert resources["PlacementGroup"]["Condition"] == "MakePlacementGroup"
    assert resources["PlacementGroup"]["Properties"] == {"Strategy": "cluster"}
    placement = resources["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["Placement"]["Fn::If"]
    assert placement == ["MakePlacementGroup", {"GroupName": {"Ref": "PlacementGroup"}}, {"Ref": "AWS::NoValue"}]


# -- the group -----------------------------------------------------------------------------------


def test_node_count_sizes_the_spot_group_of_one_family_with_nproc_per_node_gpus():
    group = _resources()["Group"]["Properties"]
    assert group["MinSize"] == group["MaxSize"] == group["DesiredCapacity"] == {"Ref": "NodeCount"}
    assert group["CapacityRebalance"] is True
    assert _sub_text(group["AutoScalingGroupName"]) == "${AWS::StackName}-runner"
    policy = group["MixedInstancesPolicy"]
    assert policy["InstancesDistribution"]["SpotAllocationStrategy"] == "price-capacity-optimized"
    assert policy["InstancesDistribution"]["OnDemandPercentageAboveBaseCapacity"] == 0
    assert policy["InstancesDistribution"]["OnDemandBaseCapacity"] == 0
    [override] = policy["LaunchTemplate"]["Overrides"]
    wanted = override["InstanceRequirements"]
    assert [_sub_text(t) for t in wanted["AllowedInstanceTypes"]] == ["${InstanceFamily}.*"]
    assert wanted["AcceleratorCount"] == {"Min": {"Ref": "NprocPerNode"}, "Max": {"Ref": "NprocPerNode"}}
    assert wanted["AcceleratorManufacturers"] == ["nvidia"] and wanted["AcceleratorTypes"] == ["gpu"]
    assert "InstanceType" not in _resources()["LaunchTemplate"]["Properties"]["LaunchTemplateData"]


def test_the_store_is_on_demand_and_its_address_is_the_nodes_endpoint():
    resources = _resources()
    instance = resources["RendezvousInstance"]["Properties"]
    assert "InstanceMarketOptions" not in instance
    assert "InstanceMarketOptions" not in resources["RendezvousLaunchTemplate"]["Properties"]["LaunchTemplateData"]
    sub = resources["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]
    assert sub[1] == {"RendezvousIp": {"Fn::GetAtt": ["RendezvousInstance", "PrivateIp"]}}


# -- the user-data ------------------------------------------------------------------------------


def _bash_n(text: str, tmp_path: Path) -> None:
    script = tmp_path / "user-data.sh"
    script.write_text(text)
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert text.startswith("#!/bin/bash\n")


def test_the_store_user_data_is_valid_bash_that_serves_the_rendezvous_port(tmp_path):
    text = _store_user_data()
    _bash_n(text, tmp_path)
    runs = [line for line in re.sub(r"\\\n\s*", " ", text).splitlines() if line.strip().startswith("docker run")]
    assert len(runs) == 1, runs
    argv = shlex.split(runs[0])
    assert argv[argv.index("--entrypoint") + 1] == "python"
    assert argv[argv.index("$IMAGE") + 1:] == ["-m", "runner.rendezvous", "--port", "29400"]
    assert "--network" in argv and argv[argv.index("--network") + 1] == "host"
    assert "--restart" in argv  # docker brings the store back after a crash or a reboot


def test_the_node_user_data_is_valid_bash_that_runs_runner_start_with_the_torchrun_flags(tmp_path):
    text = _node_user_data()
    _bash_n(text, tmp_path)
    env, docker_args, args = container_command(text)
    for flag, value in (("--gpus", "all"), ("--stop-timeout", "120"), ("--network", "host"), ("--ipc", "host")):
        assert docker_args[docker_args.index(flag) + 1] == value, docker_args
    assert "--restart" not in docker_args
    assert env["RUNNER_BUCKET"] == "s3://b/runs" and env["RUNNER_RUN_ID"] == "exp1"
    assert env["RUNNER_SCALE_DOWN_GROUP"] == f"{STACK}-runner" and env["RUNNER_NOTICE_SOURCE"] == "ec2"
    assert args == ["--nproc-per-node", "4", "--nnodes", "3", "--rdzv-endpoint", "$RDZV_HOST:$RDZV_PORT",
                    "--", "python", "train.py", "--lr", "3e-4"]
    assert "RDZV_HOST='10.0.0.5'" in text and "RDZV_PORT='29400'" in text


PEER_STOPPED_CASE = ['76) echo "runner: another node was preempted; the job saved and stopped; starting again here"',
                     "continue ;;"]


def _exit_code_handling(text: str) -> list[str]:
    body = text[text.index("code=$?"):text.index("\ndone")]
    return [line.strip() for line in body.splitlines()]


def test_the_node_user_data_handles_exit_codes_exactly_as_the_single_node_one_plus_76():
    multi = _exit_code_handling(_node_user_data())
    single = _exit_code_handling(render_single_node_user_data(dict(PARAMS, BucketName="b")))
    at = multi.index(PEER_STOPPED_CASE[0])
    assert multi[at:at + len(PEER_STOPPED_CASE)] == PEER_STOPPED_CASE
    assert multi[:at] + multi[at + len(PEER_STOPPED_CASE):] == single
    assert at < multi.index("esac") < multi.index("failures=$((failures + 1))")  # 76 never reaches the count


def _run_loop(codes: list[int], tmp_path: Path) -> tuple[int, list[str]]:
    """The node's restart loop in bash, `runner start` exiting with `codes` in turn; (its exit, what it did).

    docker, shutdown, sleep and the store's wait are stubbed: each records a line.
    """
    text = _node_user_data()
    loop = text[text.index("failures=0\n"):text.index("\ndone", text.index("while true")) + len("\ndone")]
    stubs = f"""\
IMAGE=runner:test GROUP={STACK}-runner RDZV_HOST=10.0.0.5 RDZV_PORT=29400
codes=({" ".join(map(str, codes))}); started=0
log() {{ echo "$*" >> {shlex.quote(str(tmp_path / "did"))}; }}
wait_for_store() {{ log wait; }}
shutdown() {{ log shutdown; }}
sleep() {{ log "sleep $1"; }}
docker() {{
  if [[ " $* " != *" --name runner "* ]]; then log "${{@: -2:1}}"; return 0; fi
  [ "$started" -lt "${{#codes[@]}}" ] || {{ log "started too often"; exit 99; }}
  log "start ${{codes[$started]}}"; started=$((started + 1)); return "${{codes[$((started - 1))]}}"
}}
"""
    result = subprocess.run(["bash", "-uo", "pipefail", "-c", stubs + loop], capture_output=True, text=True,
                            timeout=20)
    did = (tmp_path / "did").read_text().splitlines()
    return result.returncode, did


def test_exit_76_starts_the_node_again_at_once_without_counting_a_failure(tmp_path):
    code, did = _run_loop([76, 76, 76, 76, 0], tmp_path)
    assert code == 0
    assert did == ["wait", "start 76"] * 4 + ["wait", "start 0"]  # no sleep, no scale-down, no shutdown
    (tmp_path / "did").unlink()
    code, did = _run_loop([1, 76, 1, 76, 1], tmp_path)
    assert code == 1  # three failures: the 76s in between neither count nor reset the count
    assert did.count("sleep 60") == 2 and did[-1] == "runner.supervisor.scale_down"
    assert [line for line in did if line.startswith("start")] == ["start 1", "start 76", "start 1", "start 76",
                                                                 "start 1"]


def test_exit_75_terminates_the_node_and_exit_2_scales_the_group_to_zero(tmp_path):
    assert _run_loop([76, 75], tmp_path) == (0, ["wait", "start 76", "wait", "start 75", "shutdown"])
    (tmp_path / "did").unlink()
    assert _run_loop([76, 2], tmp_path) == (1, ["wait", "start 76", "wait", "start 2",
                                                "runner.supervisor.scale_down"])


def test_the_node_waits_for_the_store_before_each_start(tmp_path):
    text = _node_user_data()
    function = text[text.index("wait_for_store() {"):]
    function = function[:function.index("\n}\n") + 3]
    assert text.index("wait_for_store\n", text.index("while true")) < text.index("docker run --rm --name runner")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(4)
        port = listening.getsockname()[1]
        script = f"RDZV_HOST=127.0.0.1\nRDZV_PORT={port}\n{function}wait_for_store && echo ready"
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0 and result.stdout.strip() == "ready", result.stdout + result.stderr


def test_runner_start_accepts_the_flags_the_template_passes(monkeypatch):
    """The image's entrypoint is `runner start`: the args after the image, with the env file, parse and validate."""
    from runner.cli import build_parser
    from runner.supervisor.config import StartConfig

    env, _, args = container_command(_node_user_data())
    for name in [n for n in os.environ if n.startswith("RUNNER_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = [a.replace("$RDZV_HOST:$RDZV_PORT", "10.0.0.5:29400") for a in args]
    parsed = build_parser().parse_args(["start", *args])
    assert parsed.command == "start" and parsed.bucket == "s3://b/runs" and parsed.run_id == "exp1"
    assert (parsed.nproc_per_node, parsed.nnodes, parsed.rdzv_endpoint) == (4, "3", "10.0.0.5:29400")
    assert parsed.train_command == ["python", "train.py", "--lr", "3e-4"]
    config = StartConfig(bucket=parsed.bucket, command=parsed.train_command, run_id=parsed.run_id,
                         nproc_per_node=parsed.nproc_per_node, nnodes=parsed.nnodes,
                         rdzv_endpoint=parsed.rdzv_endpoint, scale_down_group=parsed.scale_down_group)
    assert config.torchrun and config.max_nodes == 3
