"""The ``wirehub.testing`` pytest plugin, used the way an application would:
its fixtures come from the ``pytest11`` entry point, not from a conftest."""

from __future__ import annotations

import pytest

from wirehub import Config, Gateway
from wirehub.client import ServerError


def test_the_fixtures_come_from_the_entry_point(pytestconfig):
    assert pytestconfig.pluginmanager.has_plugin("wirehub")


async def test_an_application_handler_end_to_end(wirehub_gateway, wirehub_client):
    """The docs' worked example: an application's handler, its answer and
    the publication it makes, seen by a client."""
    app = Gateway(Config(port=0))

    @app.on("runner_stop")
    def stop_runner(conn, msg):
        app.publish(f"runner:{msg['runner']}", {"state": "stopped"})
        return {"type": "runner_stopped", "runner": msg["runner"]}

    async with wirehub_gateway(app) as gw, wirehub_client(gw) as client:
        events = await client.subscribe("runner:r1")
        reply = await client.request({"type": "runner_stop", "runner": "r1"})
        assert reply["type"] == "runner_stopped"
        assert (await anext(events)).data == {"state": "stopped"}
        with pytest.raises(ServerError) as refused:
            await client.request({"type": "runner_start"})
        assert refused.value.code == "unknown_type"


async def test_configured_per_test(wirehub_gateway, wirehub_client):
    async with wirehub_gateway(max_subscriptions_per_connection=1) as gw, wirehub_client(gw) as client:
        await client.subscribe("a")
        with pytest.raises(ServerError) as refused:
            await client.subscribe("b")
        assert refused.value.code == "too_many_subscriptions"
    with pytest.raises(TypeError):
        async with wirehub_gateway(gw, port=0):
            pass
