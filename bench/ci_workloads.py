"""Fixed hot-path workloads that ``bench/ci.py`` counts instructions of under callgrind.

Each workload runs once with the Cython modules and once with their pure-Python
twins, in one process (both come from ``wirehub._speedups.load``, so start-up
and imports are paid once). ``bench/ci.py`` runs this file as::

    valgrind --tool=callgrind --collect-atstart=no \\
        --toggle-collect=sys_call_tracing --dump-after=sys_call_tracing \\
        python bench/ci_workloads.py

Every measured call goes through ``sys.call_tracing``, whose C function
``sys_call_tracing`` is the bracket: callgrind counts only while inside it and
writes one dump file per call, so dump *i* holds exactly the instructions of
the *i*-th label this script prints (JSON, on stdout), and nothing of
interpreter start-up. Each workload runs once unmeasured first, so that
first-call costs (lazy imports, CPython's adaptive specialization) stay out.

Workloads are small (the pure twins run 5-50 million instructions each):
callgrind runs ~50x slower than native, and a count needs no repetition.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import struct
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from picows import WSAutoPingStrategy
from picows.picows import WSProtocol

from wirehub import _speedups
from wirehub.config import Config

CHANNEL = b"telemetry.node-17.cpu"
DATA_64 = b'{"seq":123456,"t":1732600000.123456,"v":"xxxxxxxxxxxxxxxxxxxx"}'[:64]
MESSAGE = b'{"type":"message","channel":"telemetry.node-17.cpu","offset":1,"data":' + DATA_64 + b"}"
TEXT_4K = ("telemetry ✓ " * 400).encode()[:4096]

Run = Callable[[], object]


class NullLoop:
    """A loop that drops callbacks and timers: flushes are called explicitly."""

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        pass

    def call_at(self, when: float, fn: Callable[..., object], *args: object) -> None:
        pass

    def time(self) -> float:
        return 0.0


class NullTransport:
    """Accepts writes and discards them (measures our code, not the kernel).

    ``sock`` is what ``get_extra_info("socket")`` returns (picows sets options
    on it); ``peer``, its other end, stays open as long as this transport.
    """

    def __init__(self, sock: socket.socket | None = None,
                 peer: socket.socket | None = None) -> None:
        self._sock = sock
        self._peer = peer

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, chunks: list[bytes]) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._sock if name == "socket" else default

    def is_closing(self) -> bool:
        return False


def fanout(impl: SimpleNamespace, connections: int = 200) -> Run:
    """One 136-byte frame to 200 connections, 16 messages per loop tick, then the flush."""
    flusher = impl.fanout.Flusher(NullLoop())
    batches = [impl.fanout.OutBatch(flusher, NullTransport(), 1 << 30, lambda: None)
               for _ in range(connections)]
    frame = impl.frame.build_frame(1, MESSAGE)

    def run() -> None:
        for _ in range(4):
            for _ in range(16):
                impl.fanout.fanout(batches, frame)
            flusher.flush()
    return run


def tlv_decode(impl: SimpleNamespace) -> Run:
    """Decode a TLV ``publish`` command (64 B of data)."""
    payload = impl.tlv.encode([(1, b"publish"), (2, CHANNEL), (3, DATA_64), (4, b"req-1")])
    decode = impl.tlv.decode
    return lambda: [decode(payload) for _ in range(1000)]


def tlv_encode(impl: SimpleNamespace) -> Run:
    """Encode a TLV ``message`` push (64 B of data)."""
    records = [(1, b"message"), (2, CHANNEL), (5, b"\x00" * 8), (3, DATA_64)]
    encode = impl.tlv.encode
    return lambda: [encode(records) for _ in range(1000)]


def build_frame(impl: SimpleNamespace) -> Run:
    """Frame a small and a 2-byte-length payload (RFC 6455 §5.2 header forms)."""
    build, large = impl.frame.build_frame, MESSAGE * 4
    return lambda: [(build(1, MESSAGE), build(2, large)) for _ in range(1000)]


def utf8(impl: SimpleNamespace) -> Run:
    """Validate a 4 KiB text message in three fragments, as reassembly does."""
    validator = impl.frame.Utf8Validator()
    parts = (TEXT_4K[:1000], TEXT_4K[1000:3001], TEXT_4K[3001:])

    def run() -> None:
        for _ in range(100):
            for part in parts:
                validator.feed(part)
            validator.finish()
    return run


def bucket(impl: SimpleNamespace) -> Run:
    """Take tokens from a bucket that refills between calls."""
    tokens = impl.bucket.TokenBucket(1e6, 1e6, 0.0)
    clock = [0.0]

    def run() -> None:
        now = clock[0]
        for _ in range(2000):
            now += 1e-6
            tokens.consume(1.0, now)
        clock[0] = now
    return run


def deflate(impl: SimpleNamespace) -> Run:
    """Compress a message with the shared no-context-takeover compressor; inflate it back."""
    deflater = impl.deflate.Deflater(no_context_takeover=True)
    inflater = impl.deflate.Inflater(max_message_bytes=1 << 20, max_ratio=100)
    compressed = deflater.compress(MESSAGE)

    def run() -> None:
        for _ in range(100):
            deflater.compress(MESSAGE)
            inflater.feed(compressed, True)
    return run


class NullSink:
    """The listener's upstairs, doing nothing with what it is told."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: None


def _client_frame(opcode: int, payload: bytes, fin: bool) -> bytes:
    """A masked client frame (RFC 6455 §5.3) with a zero key, so the payload reads as is."""
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        return struct.pack(">BB4x", first, 0x80 | len(payload)) + payload
    return struct.pack(">BBH4x", first, 0x80 | 126, len(payload)) + payload


def listener(impl: SimpleNamespace) -> Run:
    """Receive a 4 KiB text message in three fragments through picows into ``FrameListener``.

    picows parses the frames (the same code for both twins); ours reassembles,
    checks UTF-8 and takes from the rate-limit buckets of ``Config()``'s defaults.
    A real loopback socket backs the transport because picows sets socket
    options on it; nothing is written to it after the handshake.
    """
    server = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(server.getsockname())
    sock, _ = server.accept()
    server.close()
    proto = WSProtocol(None, None, False,
                       lambda request: impl.listener.FrameListener(
                           impl.fanout.Flusher(NullLoop()), Config(), NullSink()),
                       logging.getLogger("ci.picows"), True, None,
                       False, 0, 0, WSAutoPingStrategy.PING_WHEN_IDLE, True, 1 << 20, None, 8192)
    proto.connection_made(NullTransport(sock, peer))
    _feed(proto, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    message = (_client_frame(1, TEXT_4K[:1000], False)
               + _client_frame(0, TEXT_4K[1000:3001], False)
               + _client_frame(0, TEXT_4K[3001:], True))
    return lambda: [_feed(proto, message) for _ in range(50)]


def _feed(proto: Any, data: bytes) -> None:
    """Hand ``data`` to the protocol the way the event loop does, as one read."""
    buf = proto.get_buffer(len(data))
    buf[:len(data)] = data
    proto.buffer_updated(len(data))


WORKLOADS: dict[str, Callable[[SimpleNamespace], Run]] = {
    "fanout": fanout, "tlv.decode": tlv_decode, "tlv.encode": tlv_encode,
    "frame.build": build_frame, "frame.utf8": utf8, "listener": listener,
    "bucket": bucket, "deflate": deflate,
}


async def main() -> None:
    """Run every workload per implementation; print the labels in dump order."""
    labels = []
    for name, make in WORKLOADS.items():
        for impl_name in ("ext", "pure"):
            run = make(_speedups.load(impl_name))
            run()  # warm-up, not measured
            # No cyclic GC inside the bracket: when a collection happens depends
            # on everything allocated before, not on the workload itself.
            gc.collect()
            gc.disable()
            sys.call_tracing(run, ())
            gc.enable()
            labels.append(f"{name}/{impl_name}")
    print(json.dumps(labels))


if __name__ == "__main__":
    asyncio.run(main())
