"""Scale the run's EC2 Auto Scaling group to zero when the run is finished.

Owns the one cloud call the supervisor makes besides storage and notices:
`autoscaling:SetDesiredCapacity(0)` on the group named by
`--scale-down-group` / `RUNNER_SCALE_DOWN_GROUP`, after `runner start` ends
FINISHED or ALREADY_FINISHED.

Why the runner does it, and not a person or an alarm: on a spot group with
desired capacity 1, a finished run would otherwise be relaunched forever,
each new instance paying for a boot, an image pull and a "run already
finished" exit.  The instance that saw the final snapshot is the one that
knows; it sets the group's desired capacity (and, only if the group's
MinSize is above zero, MinSize) to 0, and the group then terminates it.

A failure here never changes the run's exit code: the training is done and
its final snapshot committed.  It is logged as one line that says what to do
(scale the group by hand, fix the instance role).  boto3 is imported only
when a group is named.

`python -m runner.supervisor.scale_down GROUP` does the same from a shell
(deploy/aws/runner-spot.yaml's user-data uses it after a failure for good).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

log = logging.getLogger("runner.supervisor")


class ScaleDownError(RuntimeError):
    """The group could not be scaled to zero (missing permission, unknown group, no endpoint)."""


def scale_to_zero(group: str, client: object | None = None) -> None:
    """Set `group`'s desired capacity to 0 (and MinSize to 0 when it is higher).

    `client` is a boto3 autoscaling client; default: one built from the
    environment (AWS_REGION, AWS_ENDPOINT_URL, the instance role).
    Raises ScaleDownError with a one-line reason.
    """
    try:
        if client is None:
            import boto3

            client = boto3.client("autoscaling")
        groups = client.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
        if not groups:
            raise ScaleDownError(f"auto scaling group {group!r} does not exist (check --scale-down-group)")
        if groups[0]["MinSize"] > 0:
            client.update_auto_scaling_group(AutoScalingGroupName=group, MinSize=0, DesiredCapacity=0)
        else:
            client.set_desired_capacity(AutoScalingGroupName=group, DesiredCapacity=0, HonorCooldown=False)
    except ScaleDownError:
        raise
    except Exception as exc:  # botocore's errors: no credentials, AccessDenied, no region, unreachable endpoint
        raise ScaleDownError(f"cannot scale auto scaling group {group!r} to zero: {exc}") from None


def after_run(group: str | None, finished: bool) -> None:
    """The supervisor's hook: scale `group` to zero when the run finished; logs, never raises."""
    if not group or not finished:
        return
    try:
        scale_to_zero(group)
    except ScaleDownError as exc:
        log.error("%s; the run is finished, set the group's desired capacity to 0 by hand "
                  "(the instance role needs autoscaling:SetDesiredCapacity on it)", exc)
        return
    log.info("run finished: auto scaling group %s scaled to zero", group)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m runner.supervisor.scale_down GROUP`: 0 done, 1 failed, 2 usage."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m runner.supervisor.scale_down GROUP", file=sys.stderr)
        return 2
    try:
        scale_to_zero(args[0])
    except ScaleDownError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        return 1
    print(f"runner: auto scaling group {args[0]} scaled to zero", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
