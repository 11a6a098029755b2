"""A tiny picows server that speaks the fan-out subset of the wirehub protocol.

It exists for two reasons: the loadgen tests need a server that breaks the
protocol on purpose (``--skip-offset``, ``--dup-offset``, ``--close-after``,
``--reset``), and the loadgen's wirehub code path can be exercised before the
real gateway exists. It is not a benchmark target: it decodes every publish
in Python.

Supported: ``welcome``, ``subscribe``/``subscribed``, ``publish`` (JSON and
TLV, with ``published`` when an ``id`` is given), ``message``, ``ping``/``pong``.
Prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
from collections import defaultdict

import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

TYPE, CHANNEL, DATA, ID, OFFSET = 0x01, 0x02, 0x03, 0x04, 0x05


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


def tlv(records: list[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack(">BI", tag, len(v)) + v for tag, v in records)


def parse_tlv(payload: bytes) -> dict[int, bytes]:
    out, pos = {}, 0
    while pos + 5 <= len(payload):
        tag, length = struct.unpack_from(">BI", payload, pos)
        out[tag] = payload[pos + 5:pos + 5 + length]
        pos += 5 + length
    return out


class Hub:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.subs: dict[str, set[WSTransport]] = defaultdict(set)
        self.offsets: dict[str, int] = defaultdict(int)
        self.delivered: dict[WSTransport, int] = defaultdict(int)

    def next_offset(self, channel: str) -> int:
        self.offsets[channel] += 1
        if self.offsets[channel] == self.args.skip_offset:
            self.offsets[channel] += 1  # this offset is never delivered: a gap
        return self.offsets[channel]

    def deliver(self, channel: str, offset: int, json_data: bytes | None, raw: bytes | None) -> None:
        copies = 2 if offset == self.args.dup_offset else 1
        for t in list(self.subs[channel]):
            for _ in range(copies):
                if json_data is not None:
                    t.send(WSMsgType.TEXT, b'{"type":"message","channel":' + _dumps(
                        channel).encode() + b',"offset":%d,"data":' % offset + json_data + b"}")
                else:
                    t.send(WSMsgType.BINARY, tlv([(TYPE, b"message"), (CHANNEL, channel.encode()),
                                                  (OFFSET, struct.pack(">Q", offset)),
                                                  (DATA, raw or b"")]))
            self.delivered[t] += 1
            if self.args.close_after and self.delivered[t] >= self.args.close_after:
                t.send_close(WSCloseCode.TRY_AGAIN_LATER, b"slow consumer")
                t.disconnect()
                self.subs[channel].discard(t)


class Session(WSListener):  # type: ignore[misc]
    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self.hub = hub

    def on_ws_connected(self, transport: WSTransport) -> None:
        transport.send(WSMsgType.TEXT, b'{"type":"welcome","client_id":"mock","server":"mock/0"}')

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for subs in self.hub.subs.values():
            subs.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif frame.msg_type == WSMsgType.TEXT:
            self.on_json(transport, json.loads(frame.get_payload_as_bytes()))
        elif frame.msg_type == WSMsgType.BINARY:
            self.on_tlv(transport, parse_tlv(frame.get_payload_as_bytes()))

    def on_json(self, t: WSTransport, msg: dict) -> None:
        kind, ident = msg.get("type"), msg.get("id")
        if kind == "subscribe":
            self.hub.subs[msg["channel"]].add(t)
            t.send(WSMsgType.TEXT, _dumps({"type": "subscribed", "channel": msg["channel"]}).encode())
        elif kind == "publish":
            offset = self.hub.next_offset(msg["channel"])
            self.hub.deliver(msg["channel"], offset, _dumps(msg["data"]).encode(), None)
            if ident is not None:
                t.send(WSMsgType.TEXT, _dumps({"type": "published", "channel": msg["channel"],
                                                   "offset": offset, "id": ident}).encode())
        elif kind == "ping":
            t.send(WSMsgType.TEXT, _dumps({"type": "pong", "id": ident}).encode())

    def on_tlv(self, t: WSTransport, rec: dict[int, bytes]) -> None:
        kind, channel = rec.get(TYPE), rec.get(CHANNEL, b"").decode()
        if kind == b"subscribe":
            self.hub.subs[channel].add(t)
            t.send(WSMsgType.BINARY, tlv([(TYPE, b"subscribed"), (CHANNEL, channel.encode())]))
        elif kind == b"publish":
            offset = self.hub.next_offset(channel)
            self.hub.deliver(channel, offset, None, rec.get(DATA))
            if ID in rec:
                t.send(WSMsgType.BINARY, tlv([(TYPE, b"published"), (CHANNEL, channel.encode()),
                                              (OFFSET, struct.pack(">Q", offset)), (ID, rec[ID])]))
        elif kind == b"ping":
            t.send(WSMsgType.BINARY, tlv([(TYPE, b"pong"), (ID, rec.get(ID, b""))]))


async def reset_server(port: int) -> asyncio.Server:
    """Accept TCP connections and reset them at once (SO_LINGER 0)."""
    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    return await asyncio.start_server(on_connect, "127.0.0.1", port)


async def serve(args: argparse.Namespace) -> None:
    if args.reset:
        server = await reset_server(args.port)
    else:
        hub = Hub(args)
        server = await ws_create_server(lambda _r: Session(hub), "127.0.0.1", args.port,
                                        enable_auto_pong=True)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--skip-offset", type=int, default=0, help="never deliver this offset")
    parser.add_argument("--dup-offset", type=int, default=0, help="deliver this offset twice")
    parser.add_argument("--close-after", type=int, default=0,
                        help="close each subscriber with 1013 after this many deliveries")
    parser.add_argument("--reset", action="store_true", help="reset every TCP connection")
    uvloop.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
