"""The docs' commands that run locally are run here, so they cannot rot.

A fenced block opened with ```` ```bash runnable ```` is executed; every
runnable block of one page runs in order in one `bash -euo pipefail`, in a
fresh temporary folder (the pages side by side), with the checkout's .venv first on PATH (so `runner`
and `python` are what scripts/setup installed) and no RUNNER_* variables
from the caller.  Blocks opened with plain ```` ```bash ```` are shown only
(they need a cloud account or Docker).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import PYTHON, ROOT, subprocess_env

DOCS = Path(ROOT, "docs")
RUNNABLE = re.compile(r"^```bash runnable\n(.*?)^```", re.S | re.M)
FENCE = re.compile(r"^```(\S*)", re.M)


def runnable_blocks(page: Path) -> list[str]:
    return RUNNABLE.findall(page.read_text())


PAGES = sorted(p for p in DOCS.glob("*.md") if runnable_blocks(p))


@pytest.fixture(scope="module")
def page_results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every page's blocks, the pages run side by side (each in its own folder) to keep this under a minute."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("RUNNER_")}
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"
    procs = {}
    for page in PAGES:
        script = "\n".join(runnable_blocks(page))
        procs[page.name] = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], env=env, text=True,
                                            cwd=tmp_path_factory.mktemp(page.stem), stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT)
    results = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out)
    return results


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_runnable_blocks_of_the_page_succeed(page: Path, page_results):
    result = page_results[page.name]
    assert result.returncode == 0, f"{page.name}: exit {result.returncode}\n{result.stdout[-6000:]}"


def test_the_pages_a_new_user_follows_exist_and_are_linked_from_the_readme():
    readme = Path(ROOT, "README.md").read_text()
    for name in ("quickstart", "adapting-your-script", "operations", "troubleshooting", "exact-resume", "cost",
                 "multi-node", "scale"):
        assert (DOCS / f"{name}.md").exists(), name
        assert f"docs/{name}.md" in readme, f"README.md's Documentation section lacks docs/{name}.md"
    assert Path(ROOT, "deploy", "alibaba", "README.md").exists()


def test_every_bash_block_is_marked_runnable_or_not_on_purpose():
    """A typo such as ```bash-runnable would silently skip a block."""
    for page in DOCS.glob("*.md"):
        for info in FENCE.findall(page.read_text()):
            assert info in ("", "bash", "python", "text", "yaml", "json", "dockerfile"), f"{page.name}: ```{info}"
    assert sum(len(runnable_blocks(p)) for p in PAGES) >= 4
