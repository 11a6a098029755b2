"""pytest fixtures for applications built on wirehub (a ``pytest11`` plugin).

Installed with wirehub and loaded by pytest on its own. Both fixtures hand
the test an async context manager factory rather than a started object, so
the gateway and the client live in the test's own event loop whatever runs
it (pytest-asyncio, anyio, or a hand-made loop)::

    async def test_runner_stop(wirehub_gateway, wirehub_client):
        app = Gateway(Config(port=0))
        app.on("runner_stop", stop_runner)          # the application's handler
        async with wirehub_gateway(app) as gw, wirehub_client(gw) as client:
            events = await client.subscribe("runner:r1")
            reply = await client.request({"type": "runner_stop", "runner": "r1"})
            assert reply["type"] == "runner_stopped"
            assert (await anext(events)).data == {"state": "stopped"}

``wirehub_gateway(**config)`` starts ``Gateway(Config(port=0, **config))``;
``wirehub_gateway(gateway)`` starts one the test built (its ``port`` should
be 0). ``wirehub_client(gw, **options)`` is a connected ``wirehub.Client``
(its reconnect delays shortened for tests). Both stop what they started.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from .client import Client
from .config import Config
from .gateway import Gateway

# A test's client retries fast: a test that restarts its gateway should not wait seconds.
TEST_BACKOFF = {"reconnect_interval_s": 0.05, "max_reconnect_interval_s": 0.5}


@contextlib.asynccontextmanager
async def _gateway(gateway: Gateway | None = None, **config: Any) -> AsyncIterator[Gateway]:
    if gateway is not None and config:
        raise TypeError("pass a Gateway or configuration, not both")
    gw = gateway if gateway is not None else Gateway(Config(**{"port": 0, **config}))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(timeout_s=1.0)


@contextlib.asynccontextmanager
async def _client(gateway: Gateway | str, path: str | None = None, **options: Any) -> AsyncIterator[Client]:
    if isinstance(gateway, Gateway):
        url = f"ws://127.0.0.1:{gateway.port}{path or gateway.config.ws_path}"
    else:
        url = gateway
    client = Client(url, **{**TEST_BACKOFF, **options})
    await client.start()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def wirehub_gateway() -> Callable[..., contextlib.AbstractAsyncContextManager[Gateway]]:
    """``async with wirehub_gateway(**config) as gw`` (or ``wirehub_gateway(gateway)``):
    a gateway on a free loopback port, stopped afterwards."""
    return _gateway


@pytest.fixture
def wirehub_client() -> Callable[..., contextlib.AbstractAsyncContextManager[Client]]:
    """``async with wirehub_client(gw, **options) as client``: a connected
    ``wirehub.Client`` (``wait_for``, ``request``, ``subscribe``), closed afterwards."""
    return _client
