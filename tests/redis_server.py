"""Private ``redis-server`` processes for the shared-broker tests: on free
ports, in temporary directories, so that a test can kill and restart its
own Redis without touching anyone else's."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import free_port

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """One ``redis-server``; ``stop`` (SIGKILL by default) and ``start`` again keep its port and directory.

    Args:
        directory: where it keeps its AOF (with ``appendonly``).
        appendonly: persistence on (``appendfsync always``: nothing it
            acknowledged is lost when it is killed) or off (a restart empties it).
    """

    def __init__(self, directory: Path, *, appendonly: bool = False, extra: tuple[str, ...] = ()) -> None:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (apt install redis-server): the shared-broker tests need it")
        self.port = free_port()
        self.directory = directory
        self.args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--dir", str(directory), "--appendonly", "yes" if appendonly else "no",
                     "--appendfsync", "always", "--protected-mode", "no", *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            assert self.proc.poll() is None, f"redis-server exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.02)

    def stop(self, kill: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def command(self, *args: str) -> bytes:
        """Run one command with redis-cli; its raw output."""
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, check=True,
                              timeout=10).stdout

