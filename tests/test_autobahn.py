"""The Autobahn|Testsuite runner (tools/autobahn/run.py) works end to end.

One case (1.1.1) against the bundled picows echo: it proves the pinned
Python 2.7 virtualenv builds and runs and that the report is parsed. Two
cases (1.1.1, and 12.1.1 with permessage-deflate) of the fuzzingserver
against the Python client's echo agent (``--client``): the client harness
runs, and the client negotiates compression. The full conformance runs are
`python tools/autobahn/run.py` and `... --client` (docs/conformance.md).

Without Python 2.7 the runner exits 77 and this test is skipped with the
runner's own instructions, except under CI (CI=true), where 2.7 is expected
and its absence fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tools" / "autobahn" / "run.py"
EXIT_SKIPPED = 77


def run_runner(*args: str) -> subprocess.CompletedProcess:
    """The runner with ``args``; skipped (failed under CI=true) without Python 2.7."""
    proc = subprocess.run(
        [sys.executable, str(RUNNER), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,  # the first run builds the py2 venv (compiles wsaccel, ujson)
    )
    if proc.returncode == EXIT_SKIPPED:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Python 2.7 is missing in CI:\n{proc.stderr}")
        pytest.skip(proc.stderr.strip())
    return proc


@pytest.mark.slow
def test_runner_one_case_against_picows_echo(tmp_path):
    proc = run_runner("--server", "picows", "--cases", "1.1.1", "--reports", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "against picows-echo: 1 cases" in proc.stdout
    assert "| **all** | **1** | **0** | **0** | **0** | **0** | **1** |" in proc.stdout
    assert (tmp_path / "servers" / "index.json").exists()


@pytest.mark.slow
def test_runner_two_cases_against_the_python_client(tmp_path):
    proc = run_runner("--client", "--cases", "1.1.1,12.1.1", "--strict", "--reports", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fuzzingserver against wirehub-client: 2 cases" in proc.stdout
    # 12.1.1 OK, not UNIMPLEMENTED: the client offered permessage-deflate and took the answer.
    assert "| **all** | **2** | **0** | **0** | **0** | **0** | **2** |" in proc.stdout
    assert (tmp_path / "clients" / "index.json").exists()


def test_runner_skips_without_python2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--python2", str(tmp_path / "no-python2.7")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_SKIPPED
    assert "pyenv install 2.7.18" in proc.stderr
    assert "exit status 77" in proc.stderr
