"""A real Docker engine for the tests: found through DOCKER_HOST or started by tests/engine/.

``engine_host()`` returns a ``DOCKER_HOST`` that answers ``/_ping``: the
environment's when it answers, else the one ``tests/engine/start-engine.sh``
starts (installing docker.io on first use), which ``stop_started_engine()``
stops again when the test session ends (an engine left running keeps its
data root mounted inside the clone, which a later ``rm -rf`` trips on). When
no engine can be had the tests are skipped with the reason, except under CI
(``CI`` set), where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ENGINE_DIR = Path(__file__).resolve().parent / "engine"
IMAGE = "wirehub-test/busybox"
LABEL = "org.wirehub.test"


def ping(host: str, timeout_s: float = 2.0) -> bool:
    """Whether the engine at ``host`` (``unix://...``) answers ``/_ping``."""
    if not host.startswith("unix://"):
        return False
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout_s)
            s.connect(host[len("unix://"):])
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            data = b""
            while b"\r\n" not in data and len(data) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    status = data.split(b"\r\n", 1)[0].split(b" ")
    return len(status) > 1 and status[0].startswith(b"HTTP/1.") and status[1] == b"200"


def run_script(name: str) -> str:
    result = subprocess.run(["bash", str(ENGINE_DIR / name)], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout.strip()


def _script_socket() -> Path:
    root = Path(os.environ.get("WIREHUB_ENGINE_DIR") or ENGINE_DIR.parent.parent / ".cache" / "engine")
    return (root / "docker.sock").resolve()


def engine_host() -> str:
    """A DOCKER_HOST that answers (see module docstring)."""
    host = os.environ.get("DOCKER_HOST", "")
    if host and ping(host):
        return host
    try:
        host = run_script("start-engine.sh")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        reason = (f"no Docker engine: DOCKER_HOST={host or '(unset)'} does not answer and "
                  f"tests/engine/start-engine.sh could not start one: {exc}")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    os.environ["DOCKER_HOST"] = host
    _started.append(host)
    return host


_started: list[str] = []  # engines this test session started


def stop_started_engine() -> None:
    """Stop the engine ``engine_host()`` started in this session, if it did."""
    if _started:
        _started.clear()
        os.environ.pop("DOCKER_HOST", None)
        run_script("stop-engine.sh")


def managed(host: str) -> bool:
    """Whether ``host`` is the engine the scripts control (so a test may restart it)."""
    return host.startswith("unix://") and Path(host[len("unix://"):]).resolve() == _script_socket()


def restart_engine(down_s: float = 0.0) -> None:
    """Stop the scripts' engine, wait ``down_s``, start it again (same data)."""
    run_script("stop-engine.sh")
    time.sleep(down_s)
    run_script("start-engine.sh")


class Containers:
    """Test containers on the engine, all removed at the end."""

    def __init__(self, api: Any, test_label: str) -> None:
        self.api = api
        self.test_label = test_label
        self.ids: list[str] = []

    def create(self, script: str, *, tty: bool = False, labels: dict[str, str] | None = None,
               name: str | None = None, start: bool = True) -> str:
        labels = {LABEL: self.test_label, **(labels or {})}
        container = self.api.create_container(
            IMAGE, ["sh", "-c", script], tty=tty, labels=labels, name=name,
            # sh as PID 1 ignores SIGTERM: stopping (and the engine's own shutdown)
            # would wait 10 s for nothing.
            stop_signal="SIGKILL",
            host_config=self.api.create_host_config(network_mode="none"))
        self.ids.append(container["Id"])
        if start:
            self.api.start(container["Id"])
        return container["Id"]

    def signal(self, container_id: str, flag: str = "go") -> None:
        """Create /tmp/<flag> in the container (scripts wait for it with ``wait_for``)."""
        exec_id = self.api.exec_create(container_id, ["touch", f"/tmp/{flag}"])
        self.api.exec_start(exec_id)

    def remove_all(self) -> None:
        for container_id in self.ids:
            with contextlib.suppress(Exception):
                self.api.remove_container(container_id, force=True)


def wait_for(flag: str = "go") -> str:
    """Shell snippet: block until /tmp/<flag> exists."""
    return f"until [ -e /tmp/{flag} ]; do sleep 0.02; done"


@contextlib.contextmanager
def containers(api: Any, test_label: str) -> Iterator[Containers]:
    made = Containers(api, test_label)
    try:
        yield made
    finally:
        made.remove_all()
