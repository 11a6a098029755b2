"""A compiled module that does not import is never replaced silently.

Each test runs Python in a subprocess whose import system refuses
``wirehub._ext.fanout`` (what a missing build or a broken ``cimport`` does),
and checks what ``wirehub serve`` and an embedded ``Gateway`` make of it.
"""

from __future__ import annotations

import subprocess
import sys

from helpers import free_port

BROKEN = """
import importlib.abc, sys

class Broken(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "wirehub._ext.fanout":
            raise ImportError("undefined symbol: __pyx_simulated", name=name)
        return None

sys.meta_path.insert(0, Broken())
"""

SERVE = BROKEN + """
from wirehub import cli
sys.exit(cli.main(sys.argv[1:]))
"""

EMBEDDED = BROKEN + """
import asyncio, logging
from wirehub import Config, Gateway

async def main():
    gateway = Gateway(Config(port=0))
    await gateway.start()
    print(gateway.impl.name, gateway.metrics.render(0, 0).split("\\nwirehub_build_info")[1].split()[0])
    await gateway.stop()

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
asyncio.run(main())
"""


def test_serve_refuses_to_start_on_the_pure_twins_and_says_why():
    proc = subprocess.run([sys.executable, "-c", SERVE, "serve", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert ("the compiled hot path did not import: wirehub._ext.fanout did not import: "
            "undefined symbol: __pyx_simulated") in proc.stderr
    assert "--pure-hot-path" in proc.stderr


def test_serve_starts_on_the_pure_twins_when_told_to():
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--port", str(free_port()),
                             "--pure-hot-path"], stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline() for _ in range(3)]
        assert any("(pure hot path)" in line for line in lines), lines
        assert any(" warning wirehub.gateway the compiled hot path did not import (wirehub._ext.fanout"
                   in line for line in lines), lines
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def test_an_embedded_gateway_warns_and_shows_it_on_metrics():
    proc = subprocess.run([sys.executable, "-c", EMBEDDED], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    name, build_info = proc.stdout.split()
    assert name == "pure" and build_info.startswith('{hot_path="pure",version="')
    assert "WARNING wirehub.gateway the compiled hot path did not import " \
           "(wirehub._ext.fanout did not import: undefined symbol: __pyx_simulated)" in proc.stderr
