"""Install: runner's declared dependency ranges against the installed metadata.

A plain `pip install runner` (no constraints file) resolves only while the
storage block of pyproject.toml stays a closed, consistent set: s3fs brings
aiobotocore, each aiobotocore pins botocore to a few patch releases, and each
boto3 X.Y.Z needs botocore >=X.Y.Z,<X.(Y+1).  If runner allowed a boto3 newer
than the newest aiobotocore's botocore pin, the resolver would take it first and
then backtrack s3fs into releases that cannot be installed (ResolutionImpossible).
These tests read what is installed (importlib.metadata of runner, boto3,
botocore, aiobotocore, s3fs, fsspec, torch, torchaudio) and check the chain; the
plain installs themselves (newest, and oldest s3fs) run in .ci/run.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# Extras whose requirements are checked when all their packages are installed.
EXTRAS = ("test", "transformers", "lightning", "oss", "gcs")


def _requirements(dist: str, extra: str = "") -> list[Requirement]:
    """`dist`'s requirements that apply here: the base ones, or (given `extra`) only that extra's."""
    out = []
    for raw in md.distribution(dist).requires or []:
        req = Requirement(raw)
        base = req.marker is None or req.marker.evaluate({"extra": ""})
        if (not extra and base) or (extra and not base and req.marker.evaluate({"extra": extra})):
            out.append(req)
    return out


def _requirement_on(dist: str, name: str) -> Requirement:
    for req in _requirements(dist):
        if canonicalize_name(req.name) == canonicalize_name(name):
            return req
    pytest.fail(f"{dist} {md.version(dist)} declares no requirement on {name}")


def _bounds(spec: SpecifierSet) -> tuple[Version | None, tuple[Version, bool] | None]:
    """(lower bound, (upper bound, inclusive)) of a range like '>=a,<b'; None where open."""
    low = high = None
    for s in spec:
        v = Version(s.version)
        if s.operator in (">=", ">", "~=") and (low is None or v > low):
            low = v
        elif s.operator in ("<", "<=") and (high is None or v < high[0]):
            high = (v, s.operator == "<=")
        elif s.operator == "==" and "*" not in s.version:
            low, high = v, (v, True)
    return low, high


def _next_minor(v: Version) -> Version:
    return Version(f"{v.major}.{v.minor + 1}.0")


def _installed(name: str) -> Version | None:
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None


def test_installed_versions_satisfy_runners_requirements() -> None:
    problems = []
    for req in _requirements("runner"):
        have = _installed(req.name)
        if have is None:
            problems.append(f"{req.name} is not installed (runner needs {req})")
        elif not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name} {have} is installed, runner needs {req}")
    for extra in EXTRAS:
        reqs = _requirements("runner", extra)
        if reqs and all(_installed(r.name) is not None for r in reqs):
            for req in reqs:
                have = _installed(req.name)
                if not req.specifier.contains(have, prereleases=True):
                    problems.append(f"{req.name} {have} is installed, runner[{extra}] needs {req}")
    assert not problems, "; ".join(problems)


def test_installed_runner_metadata_matches_pyproject() -> None:
    """A stale install (pyproject.toml edited since) would make the other checks read old ranges."""
    tomllib = pytest.importorskip("tomllib")
    if not PYPROJECT.exists():
        pytest.skip("no pyproject.toml beside the tests (running from an installed copy)")
    project = tomllib.loads(PYPROJECT.read_text())["project"]

    def key(req: Requirement) -> tuple:
        return (canonicalize_name(req.name), str(req.specifier), frozenset(req.extras), str(req.marker or ""))

    declared = {key(Requirement(r)) for r in project["dependencies"]}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        declared |= {key(Requirement(f'{r}; extra == "{extra}"')) for r in reqs}
    installed = {key(Requirement(r)) for r in md.distribution("runner").requires or []}
    assert installed == declared, (
        f"installed runner {md.version('runner')} does not match pyproject.toml "
        f"(only installed: {sorted(installed - declared)}; only declared: {sorted(declared - installed)}): "
        "rerun scripts/setup"
    )


def test_storage_chain_is_consistent() -> None:
    """s3fs -> aiobotocore -> botocore <- boto3, and s3fs -> fsspec, as installed."""
    pairs = [("s3fs", "aiobotocore"), ("s3fs", "fsspec"), ("aiobotocore", "botocore"), ("boto3", "botocore")]
    problems = []
    for dist, dep in pairs:
        req = _requirement_on(dist, dep)
        have = _installed(dep)
        if have is None or not req.specifier.contains(have, prereleases=True):
            problems.append(f"{dist} {md.version(dist)} needs {req}, installed {dep} is {have}")
    assert not problems, "; ".join(problems)


def test_boto3_needs_its_own_botocore_release_line() -> None:
    """boto3 X.Y.Z needs botocore >=X.Y.Z,<X.(Y+1): the rule the range check below relies on."""
    boto3 = Version(md.version("boto3"))
    spec = _requirement_on("boto3", "botocore").specifier
    assert _bounds(spec) == (boto3, (_next_minor(boto3), False)), (
        f"boto3 {boto3} needs botocore {spec}, not >={boto3},<{_next_minor(boto3)}: "
        "the boto3 range in pyproject.toml can no longer be derived from aiobotocore's botocore pin"
    )


def test_runners_boto3_range_meets_aiobotocores_botocore_range() -> None:
    """Some boto3 runner allows takes a botocore that the installed aiobotocore accepts."""
    boto3_spec = _requirement_on("runner", "boto3").specifier
    botocore_spec = _requirement_on("aiobotocore", "botocore").specifier
    lows = [v for v in (_bounds(boto3_spec)[0], _bounds(botocore_spec)[0]) if v is not None]
    # boto3 == c needs botocore >= c on c's release line, so c fits both ranges or none does.
    witness = max(lows) if lows else Version(md.version("botocore"))
    assert boto3_spec.contains(witness) and botocore_spec.contains(witness), (
        f"runner's boto3 range {boto3_spec} and aiobotocore {md.version('aiobotocore')}'s botocore "
        f"range {botocore_spec} (under s3fs {md.version('s3fs')}) have no release in common"
    )


def test_newest_boto3_allowed_fits_the_newest_aiobotocore_allowed() -> None:
    """The resolver tries runner's newest boto3 first: it must fit the newest aiobotocore's botocore pin.

    Otherwise a plain install takes a boto3 that no allowed aiobotocore accepts and
    backtracks s3fs until it fails.  Checked where the newest aiobotocore runner
    allows is installed (the .venv that constraints.txt describes).
    """
    boto3_spec = _requirement_on("runner", "boto3").specifier
    aio_spec = _requirement_on("runner", "aiobotocore").specifier
    _, boto3_top = _bounds(boto3_spec)
    _, aio_top = _bounds(aio_spec)
    assert boto3_top is not None, (
        f"runner's boto3 range {boto3_spec} has no top: a plain install takes the newest boto3, "
        "whose botocore no aiobotocore may accept yet; cap it at the newest aiobotocore's botocore pin"
    )
    assert aio_top is not None and aio_top[1], (
        f"runner's aiobotocore range {aio_spec or '(any)'} needs an inclusive top (<=X.Y.Z): "
        "the newest release whose botocore pin the boto3 range was checked against"
    )
    aio = Version(md.version("aiobotocore"))
    if aio != aio_top[0]:
        pytest.skip(f"aiobotocore {aio} is installed, not the newest runner allows ({aio_top[0]})")
    botocore_spec = _requirement_on("aiobotocore", "botocore").specifier
    low, high = _bounds(botocore_spec)
    top, inclusive = boto3_top
    if inclusive:
        # boto3 == top accepts botocore in [top, next minor); one of those must fit the pin.
        witness = max(top, low) if low is not None else top
        fits = witness < _next_minor(top) and botocore_spec.contains(witness)
        allows, needs = f"up to {top}", f"needs botocore >={top},<{_next_minor(top)}"
    else:
        # The newest boto3 below `top` may be just under it: the pin must reach that far.
        fits = high is not None and top <= high[0] and (low is None or top > low)
        allows, needs = f"below {top}", f"can need botocore up to just under {top}"
    assert fits, (
        f"runner allows boto3 {allows}, which {needs}, but "
        f"aiobotocore {aio} (the newest runner allows) pins botocore {botocore_spec}: a plain install would "
        "pick that boto3 and backtrack s3fs into a dead end; set boto3's top to that botocore range"
    )


def test_torch_and_torchaudio_import_together() -> None:
    """The supported pair (pyproject.toml) loads: torchaudio's metadata does not say which torch it needs."""
    proc = subprocess.run(
        [sys.executable, "-c", "import torch, torchaudio; print(torch.__version__, torchaudio.__version__)"],
        capture_output=True, text=True, timeout=300,
    )
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    assert proc.returncode == 0, (
        f"torchaudio {md.version('torchaudio')} does not import beside torch {md.version('torch')}: {last}"
    )
