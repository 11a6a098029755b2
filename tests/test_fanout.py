"""Fan-out at scale and slow consumers, with real sockets."""

from __future__ import annotations

import asyncio
import json
import signal

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from helpers import connect_recording, json_client, rss_kib, running_gateway, start_server, until


class CountingSubscriber(WSListener):  # type: ignore[misc]
    """Records the offsets of every `message` on one channel."""

    def __init__(self, channel: str, expected: int, done: asyncio.Future) -> None:
        self.channel = channel
        self.offsets: list[int] = []
        self.expected = expected
        self.done = done
        self.transport: WSTransport | None = None
        self.subscribed = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.send(WSMsgType.TEXT, json.dumps({"type": "subscribe", "channel": self.channel}).encode())

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg = json.loads(frame.get_payload_as_bytes())
        if msg["type"] == "subscribed":
            self.subscribed.set_result(None)
        elif msg["type"] == "message":
            self.offsets.append(msg["offset"])
            if len(self.offsets) == self.expected and not self.done.done():
                self.done.set_result(None)


async def test_every_subscriber_gets_every_message_once_in_order(impl_name):
    subscribers, messages = 1000, 50
    async with running_gateway(impl_name) as gw:
        futures = [asyncio.get_running_loop().create_future() for _ in range(subscribers)]
        clients = []
        for future in futures:
            _, client = await ws_connect(lambda f=future: CountingSubscriber("wide", messages, f),
                                         f"ws://127.0.0.1:{gw.port}/ws")
            clients.append(client)
        await asyncio.gather(*(c.subscribed for c in clients))
        async with json_client(gw) as publisher:
            for i in range(messages):
                await publisher.send(type="publish", channel="wide", data={"i": i})
            await asyncio.wait_for(asyncio.gather(*futures), 30)
        for client in clients:
            assert client.offsets == list(range(1, messages + 1))
            client.transport.disconnect()
        assert gw.metrics.deliveries_total == subscribers * messages


async def test_slow_consumer_is_closed_and_memory_stays_bounded():
    """A subscriber that never reads is closed with 1013; the server's RSS
    stays bounded and a normal subscriber still gets every message."""
    high_water = 1024 * 1024
    with start_server("--high-water-bytes", str(high_water), "--max-payload-bytes", "65536",
                      "--rate-limit-messages-per-s", "0",
                      "--rate-limit-bytes-per-s", "0") as (proc, port):
        stalled = await connect_recording(port)
        stalled.send_json(type="subscribe", channel="firehose")
        assert (await stalled.recv_json())["type"] == "welcome"
        assert (await stalled.recv_json())["type"] == "subscribed"
        stalled.transport.underlying_transport.pause_reading()  # never read again

        done = asyncio.get_running_loop().create_future()
        total = 20_000
        _, healthy = await ws_connect(lambda: CountingSubscriber("firehose", total, done), f"ws://127.0.0.1:{port}/ws")
        await healthy.subscribed
        rss_before = rss_kib(proc.pid)

        publisher = await connect_recording(port)
        payload = json.dumps({"type": "publish", "channel": "firehose", "data": "x" * 1000}).encode()
        peak = rss_before
        for i in range(total):
            publisher.transport.send(WSMsgType.TEXT, payload)
            if i % 100 == 0:
                # The healthy subscriber reads on this loop: stay within 1,000 messages (1 MB) of
                # it, however fast this machine publishes, so that it never becomes slow itself.
                await until(lambda: len(healthy.offsets) >= i - 1000, what="the healthy subscriber reading")
                peak = max(peak, rss_kib(proc.pid))
        await asyncio.wait_for(done, 30)
        print(f"server RSS before {rss_before} KiB, peak {peak} KiB")
        assert healthy.offsets == list(range(1, total + 1))
        # 20 MB were published to the stalled client; the server held at most
        # high_water_bytes plus socket buffers for it.
        assert peak - rss_before < 8 * 1024, f"RSS grew by {peak - rss_before} KiB"

        stalled.transport.underlying_transport.resume_reading()
        assert await stalled.wait_closed(timeout=10) == 1013
        assert "slow consumer" in stalled.close_reason


async def test_sigterm_closes_clients_with_1001_and_exits():
    with start_server("--shutdown-timeout-s", "3") as (proc, port):
        clients = [await connect_recording(port) for _ in range(3)]
        proc.send_signal(signal.SIGTERM)
        codes = [await c.wait_closed(timeout=5) for c in clients]
        assert codes == [1001, 1001, 1001]
        # 0: stopped gracefully, before the deadline thread would have ended it with 1.
        assert proc.wait(timeout=30) == 0
