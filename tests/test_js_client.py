"""``wirehub.js`` in Node against real gateways on loopback.

Each ``tests/js/*.test.mjs`` file is a ``node:test`` suite; this module
starts the gateway it needs (in this test's event loop, so that control
messages can reach into it: ``ctl_feed`` publishes a paced feed and closes
every connection with 1012 along the way, ``ctl_advance`` moves a
``ManualClock``), runs the file with Node and fails with Node's report.

Node 22 has a global ``WebSocket``; Node 20.10+ gets it from
``--experimental-websocket``. Without a usable Node the tests are skipped
with the reason, except under CI (``CI`` set), where that is a failure.
The browser tests are ``tests/test_browser_client.py``.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from wirehub import ChannelOptions, Config, Gateway
from wirehub.auth import mint_token
from wirehub.clock import ManualClock

from helpers import free_port, running_gateway, start_server, until
from test_client import SnapshotSource

JS_TESTS = Path(__file__).parent / "js"
CLIENT_JS = resources.files("wirehub.static").joinpath("wirehub.js")
KEEP_ALL = [ChannelOptions(pattern="**", history_size=100_000)]
LIMITS_OFF = dict(max_connections_per_ip=0, new_connections_per_ip_per_s=0, rate_limit_messages_per_s=0,
                  rate_limit_bytes_per_s=0)
SECRET = "integration-secret-long-enough-for-hs256!"


def node_command() -> tuple[list[str] | None, str]:
    """How to run Node with a global ``WebSocket``, or None and why not."""
    node = shutil.which("node")
    if node is None:
        return None, "node is not installed (Node 22, or 20.10+ with --experimental-websocket)"
    version = subprocess.run([node, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout.strip()
    match = re.match(r"v(\d+)\.(\d+)", version)
    major, minor = (int(match[1]), int(match[2])) if match else (0, 0)
    if major >= 22:
        return [node], version
    if (major, minor) >= (20, 10):
        return [node, "--experimental-websocket"], version
    return None, f"node {version} has no WebSocket (Node 22, or 20.10+ with --experimental-websocket)"


@pytest.fixture(scope="module")
def node() -> list[str]:
    command, why = node_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return command


async def run_node(node: list[str], script: str, env: dict[str, str], timeout_s: float = 240,
                   on_line: Any = None) -> None:
    """Run one ``tests/js`` suite; fail with its report unless every test passed.
    ``on_line(line)`` (a coroutine function) sees each line the suite prints."""
    proc = await asyncio.create_subprocess_exec(
        *node, "--test-reporter=spec", str(JS_TESTS / script),
        env={**os.environ, "WIREHUB_JS": str(CLIENT_JS), **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    lines: list[str] = []

    async def read_stdout() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            if on_line is not None:
                await on_line(line)

    try:
        _, stderr = await asyncio.wait_for(asyncio.gather(read_stdout(), proc.stderr.read()), timeout_s)  # type: ignore[union-attr]
        await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{script} did not finish within {timeout_s} s:\n" + "\n".join(lines))
    report = "\n".join(lines) + "\n" + stderr.decode(errors="replace")
    assert proc.returncode == 0, report
    assert re.search(r"\bfail 0\b", report), report
    assert not re.search(r"\bpass 0\b", report), report


def control_handlers(gw: Gateway, clock: ManualClock | None = None) -> None:
    """The messages the Node suites use to reach into the gateway (and
    ``state:*``, a source that sends a snapshot at the subscribed offset)."""
    feeds: list[asyncio.Task[int]] = []
    snapshots = SnapshotSource()
    gw.add_source(snapshots)

    @gw.on("add")
    def add(conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
        return {"type": "sum", "value": msg["a"] + msg["b"]}

    @gw.on("ctl_feed")
    def feed(conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
        feeds.append(asyncio.ensure_future(paced_feed(gw, msg["channel"], msg["total"], msg["rate"], msg["restarts"])))
        return {"type": "feed_started"}

    @gw.on("ctl_feed_done")
    async def feed_done(conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
        return {"type": "feed_done", "restarts": await feeds[-1]}

    @gw.on("ctl_close_me")
    def close_me(conn: Any, msg: dict[str, Any]) -> None:
        asyncio.get_running_loop().call_soon(conn.close, 1012, "service restart")

    @gw.on("ctl_position")
    def position(conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
        return {"type": "position", "offset": gw.broker.position(msg["channel"]).offset}

    @gw.on("ctl_emit")
    def emit(conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
        snapshots.emit(msg["channel"], msg["n"])
        return {"type": "emitted"}

    if clock is not None:
        @gw.on("ctl_advance")
        def advance(conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
            clock.advance(msg["s"])
            return {"type": "advanced"}


async def paced_feed(gw: Gateway, channel: str, total: int, rate: float, restarts: int) -> int:
    """Publish 1..total on ``channel`` at ``rate`` per second, closing every
    connection with 1012 ``restarts`` times, evenly, never after the last
    publication, and each time only once a client is connected again."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    restart_at = {total * i // (restarts + 1) for i in range(1, restarts + 1)}
    done = 0
    for n in range(1, total + 1):
        gw.publish(channel, n)
        if n in restart_at:
            # Every restart must hit the client: wait until it is back from the last one.
            await until(lambda: gw.connections, timeout_s=30, what="a client connected")
            for conn in list(gw.connections):
                conn.close(1012, "service restart")
            done += 1
        if n % 50 == 0:
            await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
    return done


async def test_the_gateway_serves_the_client_with_an_etag():
    async with running_gateway() as gw:
        def get(headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
            conn.request("GET", "/wirehub.js", headers=headers)
            response = conn.getresponse()
            result = response.status, dict(response.getheaders()), response.read()
            conn.close()
            return result

        status, headers, body = await asyncio.to_thread(get, {})
        assert status == 200 and body == CLIENT_JS.read_bytes()
        assert headers["Content-Type"].startswith("text/javascript")
        etag = headers["ETag"]
        status, headers, body = await asyncio.to_thread(get, {"If-None-Match": etag})
        assert (status, body, headers["ETag"]) == (304, b"", etag)
        status, _, body = await asyncio.to_thread(get, {"If-None-Match": '"something-else"'})
        assert status == 200 and body == CLIENT_JS.read_bytes()


async def test_node_against_an_open_gateway(node):
    async with running_gateway(channels=KEEP_ALL, **LIMITS_OFF) as gw:
        control_handlers(gw)
        await run_node(node, "open_gateway.test.mjs", {
            "WIREHUB_URL": f"ws://127.0.0.1:{gw.port}/ws",
            "WIREHUB_DEAD_URL": f"ws://127.0.0.1:{free_port()}/ws",
        })


async def test_node_against_a_gateway_with_tokens(node):
    clock = ManualClock()
    tokens = [mint_token(SECRET, sub="alice", subscribe=["a"], ttl_s=600, now=clock.wall() + at) for at in (0, 570)]
    gw = Gateway(Config(port=0, jwt_secret=SECRET, jwt_leeway_s=0, token_expiring_notice_s=30), clock=clock)
    async with running_gateway(gateway=gw):
        control_handlers(gw, clock)
        await run_node(node, "auth_gateway.test.mjs", {
            "WIREHUB_URL": f"ws://127.0.0.1:{gw.port}/ws", "WIREHUB_TOKENS": ",".join(tokens)})


async def test_node_through_a_killed_server(node):
    port = free_port()  # the same port for both servers (a later --port wins over start_server's)
    args = ("--channel", "**:history_size=1000", "--max-connections-per-ip", "0", "--port", str(port))
    with start_server(*args) as (first, _):
        second: list[Any] = []

        async def on_line(line: str) -> None:
            if line == "kill":
                first.send_signal(signal.SIGKILL)
                first.wait()
                second.append(start_server(*args))
                second[0].__enter__()

        try:
            await run_node(node, "killed_server.test.mjs", {"WIREHUB_URL": f"ws://127.0.0.1:{port}/ws"},
                           on_line=on_line)
        finally:
            if second:
                second[0].__exit__(*sys.exc_info())
