"""Test harness: async tests on uvloop, gateways on loopback, real clients.

``async def`` tests run on a fresh uvloop loop (no pytest-asyncio needed);
an exception that reaches the loop's exception handler fails the test, as in
uvloop's own ``_testbase``.
"""

from __future__ import annotations

import asyncio
import inspect
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from wirehub import _speedups

IMPLEMENTATIONS = ["ext", "pure"]


def pytest_configure(config: pytest.Config) -> None:
    # Fan-out tests open a few thousand sockets.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    loop_errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: loop_errors.append(ctx))
        await asyncio.wait_for(pyfuncitem.obj(**args), timeout=60)

    uvloop.run(main())
    if loop_errors:
        pytest.fail(f"unhandled exception in the event loop: {loop_errors[0]}")
    return True


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> Any:
    """Each hot-path module, compiled and pure: one suite runs against both."""
    return _speedups.load(request.param)


@pytest.fixture(params=IMPLEMENTATIONS)
def impl_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A private ``redis-server`` for the test (``redis_server.py``), killed after it."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_shards(tmp_path: Path) -> Iterator[list[Any]]:
    """Two private ``redis-server`` processes, the shards of one sharded broker."""
    from redis_server import RedisServer

    servers = []
    try:
        for name in ("shard0", "shard1"):
            (tmp_path / name).mkdir()
            servers.append(RedisServer(tmp_path / name).start())
        yield servers
    finally:
        for server in servers:
            server.stop()
