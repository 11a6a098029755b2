"""Load generator: counting, order checks and failure handling.

Unit tests feed frames straight into the listeners (picows's
``_make_test_ws_frame``) and run once per implementation, Cython and pure
Python. The end-to-end tests drive real servers on 127.0.0.1 started as
subprocesses: the picows peer server and the mock wirehub server with its
fault injection (``bench/servers/``), and ``wirehub serve`` once it exists.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from picows import WSListener, WSMsgType, ws_connect, ws_create_server
from picows.picows import _make_test_ws_frame

from tools.loadgen import _pure
from tools.loadgen.cli import main
from tools.loadgen.handshake import accept_value
from tools.loadgen.histogram import N_BUCKETS, Histogram, bucket_high, bucket_index
from tools.loadgen.payload import header
from tools.loadgen.server_cpu import ServerCpuProbe, cpu_seconds
from tools.loadgen.worker import hand_over
# Not built means a broken install: the suite fails rather than test the twin alone.
from wirehub._ext import loadgen_client as _cython

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "bench" / "servers"
FAST = ["--warmup", "0.1", "--duration", "0.4", "--drain", "1", "--no-progress", "--json"]

IMPLEMENTATIONS = [pytest.param(_pure, id="python"), pytest.param(_cython, id="cython")]


# -- histogram -------------------------------------------------------------

def test_bucket_bounds_cover_values() -> None:
    for value in [0, 1, 255, 256, 257, 511, 512, 1000, 10**6, 10**9, 2**40]:
        index = bucket_index(value)
        assert bucket_high(index) >= value
        assert bucket_high(index) <= value * 1.008 + 1


def test_histogram_percentiles_and_merge() -> None:
    a, b = Histogram(), Histogram()
    for v in range(1, 1001):
        (a if v % 2 else b).record(v * 1000)
    a.merge(b)
    assert a.total == 1000
    assert a.max == 1_000_000
    assert a.value_at(50) == pytest.approx(500_000, rel=0.01)
    assert a.value_at(99) == pytest.approx(990_000, rel=0.01)
    assert a.value_at(100) == 1_000_000


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_recorder_matches_histogram_layout(impl) -> None:
    rec, ref = impl.Recorder(), Histogram()
    for v in [0, 3, 256, 999, 123_456, 10**9, 2**45]:
        rec.record_ns(v)
        ref.record(v)
    assert impl.HISTOGRAM_BUCKETS == N_BUCKETS
    assert rec.histogram_counts() == ref.counts.tobytes()


# -- subscriber bookkeeping ------------------------------------------------

def _message(offset: int, seq: int = 1, ts: int | None = None) -> bytes:
    ts = time.monotonic_ns() if ts is None else ts
    data = header(0, seq, ts).decode() + "xx"
    return ('{"type":"message","channel":"c","offset":%d,"data":"%s"}' % (offset, data)).encode()


def _feed(listener, payload: bytes, msg_type: WSMsgType = WSMsgType.TEXT) -> None:
    listener.on_ws_frame(None, _make_test_ws_frame(msg_type, payload, True, False))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_subscriber_counts_gap_duplicate_and_late_arrival(impl) -> None:
    rec = impl.Recorder()
    sub = impl.Subscriber(impl.KIND_WIREHUB_JSON, rec, 1)
    for offset in [1, 2, 4, 4, 3, 5, 2]:
        _feed(sub, _message(offset))
    # 3 was skipped then arrived late (missing back to 0); 4 and 2 repeated.
    assert (sub.received, sub.missing, sub.duplicates, sub.out_of_order) == (7, 0, 2, 1)
    sub.finish([8])
    assert sub.missing == 3 and sub.highest(0) == 8
    assert rec.received == 7 and rec.hist_total == 7


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_subscriber_raw_streams_and_malformed(impl) -> None:
    rec = impl.Recorder()
    sub = impl.Subscriber(impl.KIND_RAW, rec, 2)
    now = time.monotonic_ns()
    for pub, seq in [(0, 1), (1, 1), (1, 2), (0, 3)]:
        _feed(sub, header(pub, seq, now) + b"pad", WSMsgType.BINARY)
    _feed(sub, b"not a header at all, but long enough to look like one")
    _feed(sub, header(7, 1, now))  # publisher 7 does not exist
    assert (sub.received, sub.missing, rec.malformed) == (4, 1, 2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_json_message_in_any_field_order(impl) -> None:
    """The gateway's own field order takes a fast path; any other order still parses."""
    rec = impl.Recorder()
    sub = impl.Subscriber(impl.KIND_WIREHUB_JSON, rec, 1)
    seen = []
    sub.control = lambda _l, t, p: seen.append(p)
    data = header(0, 9, time.monotonic_ns()).decode()
    _feed(sub, ('{"type":"message","channel":"a.b:c","offset":1,"data":"%s"}' % data).encode())
    _feed(sub, ('{"channel":"a","data":"%s","offset":2,"type":"message"}' % data).encode())
    _feed(sub, ('{"type":"message","channel":"a","offset": 3,"data":"%s"}' % data).encode())
    _feed(sub, ('{"type":"message","channel":"a","offset":4,"data":"%s"}' % data.upper()).encode())
    _feed(sub, b'{"type":"message","channel":"a","offset":5,"data":"short"}')
    _feed(sub, b'{"type":"message","channel":"a","offset":x,"data":"%s"}' % data.encode())
    _feed(sub, b'{"type":"subscribed","channel":"a"}')
    # Upper-case hex, a short header and a non-numeric offset are malformed;
    # only the subscribed reply goes to the control hook.
    assert (sub.received, sub.highest(0), rec.malformed) == (3, 3, 3)
    assert seen == [b'{"type":"subscribed","channel":"a"}']


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_tlv_message_and_control_frames(impl) -> None:
    import struct

    rec = impl.Recorder()
    sub = impl.Subscriber(impl.KIND_WIREHUB_TLV, rec, 1)
    seen = []
    sub.control = lambda _l, t, p: seen.append(p)
    data = header(0, 1, time.monotonic_ns())
    msg = (struct.pack(">BI", 1, 7) + b"message" + struct.pack(">BI", 5, 8)
           + struct.pack(">Q", 1) + struct.pack(">BI", 3, len(data)) + data)
    _feed(sub, msg, WSMsgType.BINARY)
    _feed(sub, b'{"type":"welcome"}')
    _feed(sub, b"\x01\x00\x00\x00\x09mess", WSMsgType.BINARY)  # truncated record
    assert (sub.received, rec.malformed, seen) == (1, 1, [b'{"type":"welcome"}'])


# -- socket reader -----------------------------------------------------------
# A subscriber connected with picows to an in-process picows server, then
# handed over to the SocketReader the way the worker does it; the server
# writes raw frames to the socket, so split, large, control and invalid
# frames arrive exactly as written.

class _RawPeer(WSListener):  # type: ignore[misc]
    """Server side: records what the client sends; the test writes raw bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.transport = None
        self.frames: list[tuple[WSMsgType, bytes]] = []
        self.gone = asyncio.Event()

    def on_ws_connected(self, transport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport, frame) -> None:
        self.frames.append((frame.msg_type, frame.get_payload_as_bytes()))

    def on_ws_disconnected(self, transport) -> None:
        self.gone.set()

    def write(self, data: bytes) -> None:
        self.transport.underlying_transport.write(data)


def _server_frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = False) -> bytes:
    first = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = first + bytes([mask_bit | n])
    elif n < 1 << 16:
        head = first + bytes([mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head = first + bytes([mask_bit | 127]) + n.to_bytes(8, "big")
    return head + (b"\0\0\0\0" if masked else b"") + payload


async def _handed_over(impl, max_frame: int = 1 << 20):
    """(server peer, subscriber, reader, control frames seen, lost) on loopback."""
    peers: list[_RawPeer] = []

    def new_peer(_request):
        peers.append(_RawPeer())
        return peers[-1]

    server = await ws_create_server(new_peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sub = impl.Subscriber(impl.KIND_WIREHUB_JSON, impl.Recorder(), 1)
    seen: list[bytes] = []
    lost: list[object] = []
    sub.control = lambda _l, _t, payload: seen.append(payload)
    sub.lost = lost.append
    await ws_connect(lambda: sub, f"ws://127.0.0.1:{port}/", use_aiofastnet=False)
    reader = impl.SocketReader(max_frame)
    fds = len(os.listdir("/proc/self/fd"))
    hand_over(reader, sub)
    # No dup: 10,000 subscribers must not need 20,000 file descriptors.
    assert len(os.listdir("/proc/self/fd")) == fds
    asyncio.get_running_loop().add_reader(reader.fileno(), reader.on_ready)
    await _until(lambda: peers and peers[0].transport is not None)
    return server, peers[0], sub, reader, seen, lost


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def _shut(server, reader) -> None:
    asyncio.get_running_loop().remove_reader(reader.fileno())
    reader.close()
    server.close()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_socket_reader_frames_split_large_and_control(impl) -> None:
    server, peer, sub, reader, seen, lost = await _handed_over(impl)
    big = _message(3)[:-2] + b"x" * 70_000 + b'"}'          # 64-bit length
    mid = _message(4)[:-2] + b"y" * 300 + b'"}'             # 16-bit length
    frames = [_server_frame(1, _message(1)), _server_frame(9, b"hi"), _server_frame(1, _message(2)),
              _server_frame(1, big), _server_frame(1, mid), _server_frame(9, b"are you there"),
              _server_frame(1, b'{"type":"error","code":"x"}'),
              _server_frame(1, b"fragment", fin=False)]
    starts = [sum(len(f) for f in frames[:i]) for i in range(len(frames))]
    stream = b"".join(frames)
    # Cut inside a 2-byte header, a frame shorter than the longest header (the
    # next read then brings the start of the following frame too), a payload,
    # the 8-byte and the 2-byte extended lengths, and a large payload.
    cuts = [1, starts[1] + 1, starts[2] + 40, starts[3] + 5, starts[3] + 20_000, starts[4] + 3,
            len(stream)]
    for begin, end in zip([0, *cuts], cuts):
        peer.write(stream[begin:end])
        await asyncio.sleep(0.02)
    await _until(lambda: sub.received == 4 and sub.recorder.malformed == 1
                 and (WSMsgType.PONG, b"are you there") in peer.frames)
    assert [p for t, p in peer.frames if t == WSMsgType.PONG] == [b"hi", b"are you there"]
    assert (sub.highest(0), sub.missing, sub.duplicates) == (4, 0, 0)
    assert seen == [b'{"type":"error","code":"x"}']
    assert reader.connections == 1 and not lost
    peer.write(_server_frame(8, (4001).to_bytes(2, "big") + b"bye"))
    await _until(lambda: sub.disconnected)
    assert sub.close_code == 4001 and sub.recorder.server_closes == 1
    assert peer.frames[-1][0] == WSMsgType.CLOSE and peer.frames[-1][1][:2] == (4001).to_bytes(2, "big")
    assert reader.connections == 0 and lost == [sub]
    await _shut(server, reader)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize(("frame", "code"), [
    (_server_frame(1, b"masked", masked=True), 1002),
    (bytes([0xC1, 0x01]) + b"x", 1002),                     # RSV1 without an extension
    (_server_frame(3, b"opcode 3"), 1002),
    (_server_frame(9, b"p", fin=False), 1002),              # fragmented control frame
    (bytes([0x81, 127]) + (5000).to_bytes(8, "big"), 1009),  # above max_frame
])
async def test_socket_reader_closes_on_protocol_errors(impl, frame, code) -> None:
    server, peer, sub, reader, _, lost = await _handed_over(impl, max_frame=1000)
    peer.write(_server_frame(1, _message(1)) + frame)
    await asyncio.wait_for(peer.gone.wait(), 5)
    await _until(lambda: sub.disconnected)
    assert sub.received == 1 and sub.recorder.malformed == 1
    assert peer.frames[-1][0] == WSMsgType.CLOSE
    assert int.from_bytes(peer.frames[-1][1][:2], "big") == code
    assert reader.connections == 0 and lost == [sub]
    await _shut(server, reader)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_socket_reader_sees_the_connection_end(impl) -> None:
    server, peer, sub, reader, _, lost = await _handed_over(impl)
    peer.write(_server_frame(1, _message(1)) + _server_frame(1, _message(2))[:5])
    await _until(lambda: sub.received == 1)
    peer.transport.underlying_transport.abort()
    await _until(lambda: sub.disconnected)
    assert lost == [sub] and reader.connections == 0 and sub.received == 1
    await _shut(server, reader)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
async def test_socket_reader_ends_the_connection_when_a_listener_raises(impl) -> None:
    """The frames after the failing one are lost: the connection must end, visibly."""
    server, peer, sub, reader, _, lost = await _handed_over(impl)
    errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))

    def failing_hook(*_args) -> None:
        raise RuntimeError("control hook failed")

    sub.control = failing_hook
    peer.write(_server_frame(1, b'{"type":"error","code":"x"}') + _server_frame(1, _message(1)))
    await _until(lambda: sub.disconnected)
    assert lost == [sub] and reader.connections == 0 and sub.received == 0
    assert isinstance(errors[0]["exception"], RuntimeError)
    await _shut(server, reader)


# -- end to end --------------------------------------------------------------

def _start(script: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, str(SERVERS / script), "--port", "0", *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY "), line
    return proc, int(line.split()[1])


_pids: dict[int, int] = {}  # port -> server process id


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, int]]:
    specs = {"echo": ("picows_server.py", "--mode", "echo"),
             "broadcast": ("picows_server.py", "--mode", "broadcast"),
             "mock": ("mock_wirehub.py",),
             "faulty": ("mock_wirehub.py", "--skip-offset", "5", "--dup-offset", "9"),
             "slow": ("mock_wirehub.py", "--close-after", "3"),
             "reset": ("mock_wirehub.py", "--reset")}
    started = {name: _start(*spec) for name, spec in specs.items()}
    _pids.update({port: proc.pid for proc, port in started.values()})
    yield {name: port for name, (_, port) in started.items()}
    for proc, _ in started.values():
        proc.terminate()
        proc.wait()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main([*argv, *FAST])
    return code, json.loads(capsys.readouterr().out)


def test_echo_raw(servers, capsys) -> None:
    code, res = _run(capsys, "echo", "--protocol", "raw", "--binary", "--connections", "4",
                     "--inflight", "2", "--url", f"ws://127.0.0.1:{servers['echo']}/")
    assert code == 0 and res["ok"]
    assert res["throughput"]["round_trips_per_s"] > 0
    assert res["latency_us"]["count"] > 0 and res["latency_us"]["p50"] > 0


def test_server_cpu_is_measured_over_the_window(servers, capsys) -> None:
    """--server-pid: the server's CPU share and its work per CPU-second."""
    pid = _pids[servers["broadcast"]]
    code, res = _run(capsys, "fanout", "--protocol", "raw", "--subscribers", "20",
                     "--server-pid", str(pid), "--url", f"ws://127.0.0.1:{servers['broadcast']}/")
    server = res["server"]
    assert code == 0 and server["pid"] == pid
    assert 0 < server["cpu_percent"] <= 100 * (os.cpu_count() or 1)
    # Work per CPU-second is the window's deliveries over the server's CPU time.
    delivered = res["throughput"]["deliveries_per_s"] * res["window_s"]
    assert server["deliveries_per_cpu_s"] == pytest.approx(delivered / server["cpu_s"], rel=0.01)


def test_server_pid_must_exist(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fanout", "--server-pid", str(2**22 + 1), "--url", "ws://127.0.0.1:9/"])
    assert exc.value.code == 2
    assert "no such process" in capsys.readouterr().err


def test_cpu_probe_interpolates_over_a_window() -> None:
    # Spin until this process has used 0.3 CPU-seconds rather than for a wall
    # time: on a loaded machine a wall-clock spin gets a fraction of a core.
    # The window's edges fall in idle stretches, where the interpolation
    # between two samples is exact whatever the gap between them: next to the
    # spin, a sample delayed on a loaded machine made an edge off by the CPU
    # of that whole gap.
    probe = ServerCpuProbe(os.getpid())
    probe.start()
    time.sleep(0.05)
    start, cpu_start = time.monotonic_ns(), time.process_time()
    time.sleep(0.1)
    spin_start = time.process_time()
    while time.process_time() - spin_start < 0.3:
        pass
    time.sleep(0.1)
    end, used = time.monotonic_ns(), time.process_time() - cpu_start
    time.sleep(0.05)
    probe.stop()
    busy = probe.result(start, end)
    assert abs(busy["cpu_s"] - used) <= 0.03, (busy, used)
    assert busy["cpu_percent"] == pytest.approx(100 * used * 1e9 / (end - start), abs=20)
    assert "error" in probe.result(end, end + 10**10)  # not sampled
    assert cpu_seconds(os.getpid()) >= busy["cpu_s"]


def test_connect_mode_reports_server_handshakes_per_cpu_second(servers, capsys) -> None:
    pid = _pids[servers["echo"]]
    code, res = _run(capsys, "connect", "--protocol", "raw", "--connections", "300",
                     "--server-pid", str(pid), "--url", f"ws://127.0.0.1:{servers['echo']}/")
    assert code == 0 and res["connect"]["established"] == 300
    assert res["server"]["pid"] == pid and res["server"]["cpu_percent"] >= 0


def test_fanout_raw_broadcast_counts_every_delivery(servers, capsys) -> None:
    code, res = _run(capsys, "fanout", "--protocol", "raw", "--publishers", "2",
                     "--subscribers", "5", "--procs", "2",
                     "--url", f"ws://127.0.0.1:{servers['broadcast']}/")
    d = res["delivery"]
    assert code == 0, res["errors"]
    assert d["published"] > 0
    assert d["received"] == d["published"] * 5
    assert (d["missing"], d["duplicates"], d["out_of_order"]) == (0, 0, 0)


@pytest.mark.parametrize("codec", ["json", "tlv"])
def test_fanout_wirehub_counts(servers, capsys, codec) -> None:
    started = time.monotonic()
    code, res = _run(capsys, "fanout", "--codec", codec, "--publishers", "2", "--channels", "3",
                     "--subscribers", "6", "--rate", "300",
                     "--url", f"ws://127.0.0.1:{servers['mock']}/ws")
    elapsed_s = time.monotonic() - started
    d = res["delivery"]
    assert code == 0, res["errors"]
    # 6 subscribers over 3 channels: each publication reaches exactly 2 of them.
    assert d["received"] == d["published"] * 2 > 0
    # Paced: no sender runs ahead of its schedule (a publication at its start, then its share
    # of --rate), so on any machine the run cannot have published more than the rate allows in
    # the time it took. (Not the window's rate: a sender that fell behind catches up, so a loop
    # stalled for 80 ms at one edge of the 0.4 s window moves that rate by 20 %, either way.)
    assert d["published"] <= 300 * elapsed_s + 2


def test_fanout_detects_injected_gap_and_duplicate(servers, capsys) -> None:
    code, res = _run(capsys, "fanout", "--subscribers", "3", "--rate", "100",
                     "--url", f"ws://127.0.0.1:{servers['faulty']}/ws")
    d = res["delivery"]
    assert code == 1 and not res["ok"]
    assert (d["missing"], d["duplicates"], d["subscribers_with_anomalies"]) == (3, 3, 3)
    assert res["errors"]["missing"] == 3 and res["errors"]["duplicates"] == 3


def test_server_close_is_counted(servers, capsys) -> None:
    code, res = _run(capsys, "fanout", "--subscribers", "2", "--rate", "100",
                     "--url", f"ws://127.0.0.1:{servers['slow']}/ws")
    assert code == 1
    assert res["errors"]["closed_by_server_1013"] == 2


@pytest.mark.parametrize("mode", ["echo", "connect"])
@pytest.mark.parametrize("target", ["refused", "reset"])
def test_refused_and_reset_connections(servers, capsys, target, mode) -> None:
    if target == "refused":
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    else:
        port = servers["reset"]
    code, res = _run(capsys, mode, "--connections", "3", "--max-errors", "5",
                     "--url", f"ws://127.0.0.1:{port}/ws")
    assert code == 0  # 3 errors <= --max-errors 5
    assert res["errors"] == {f"connect_{target}": 3}
    assert "Traceback" not in capsys.readouterr().err


def test_connect_mode_reports_handshakes(servers, capsys) -> None:
    code, res = _run(capsys, "connect", "--connections", "50", "--concurrency", "10",
                     "--url", f"ws://127.0.0.1:{servers['mock']}/ws")
    assert code == 0
    assert res["connect"]["established"] == 50
    assert res["connect"]["handshakes_per_s"] > 0


def test_connect_mode_counts_connections_without_a_welcome(servers, capsys) -> None:
    # wirehub protocol against a server that upgrades but never says welcome.
    code, res = _run(capsys, "connect", "--connections", "20", "--connect-timeout", "0.5",
                     "--url", f"ws://127.0.0.1:{servers['echo']}/")
    assert code == 1
    assert res["connect"]["established"] == 20
    assert res["errors"] == {"setup_timeout": 20}


# Frames an idle client must refuse, and the CLOSE code it answers with.
REFUSED_FRAMES = {
    "masked": _server_frame(1, b"masked", masked=True),
    "rsv1": bytes([0xC1, 0x01]) + b"x",
    "top-bit-length": bytes([0x81, 127]) + (1 << 63).to_bytes(8, "big"),
    "oversized": bytes([0x82, 127]) + (2 << 20).to_bytes(8, "big"),
}


class _ScriptedServer(socketserver.ThreadingTCPServer):
    """A TCP server that answers each upgrade the way ``behaviour`` says and
    records what the client sent back (for the ``connect`` mode's own client)."""

    daemon_threads = True

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.replies: list[tuple[int, bytes]] = []     # (opcode, unmasked payload)
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)


class _ScriptedHandler(socketserver.StreamRequestHandler):
    server: _ScriptedServer

    def handle(self) -> None:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self.rfile.readline()
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        behaviour = self.server.behaviour
        if behaviour == "503":
            self.wfile.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            return
        accept = accept_value(b"not-" + key if behaviour == "bad-accept" else key)
        self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        if behaviour == "bad-accept":
            self.rfile.read()  # until the client drops the connection
            return
        if behaviour in REFUSED_FRAMES:
            self.wfile.write(REFUSED_FRAMES[behaviour])
            self.server.replies.append(self._read_frame())
            return
        self.wfile.write(b"\x89\x02hi")                             # PING "hi"
        self.server.replies.append(self._read_frame())
        self.wfile.write(b"\x88\x02" + (1001).to_bytes(2, "big"))   # CLOSE 1001
        self.server.replies.append(self._read_frame())

    def _read_frame(self) -> tuple[int, bytes]:
        b0, b1 = self.rfile.read(2)
        assert b1 & 0x80, "client frames must be masked"
        mask, payload = self.rfile.read(4), self.rfile.read(b1 & 0x7F)
        return b0 & 0x0F, bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


@pytest.fixture
def scripted() -> Iterator[Callable[[str], _ScriptedServer]]:
    started: list[_ScriptedServer] = []

    def start(behaviour: str) -> _ScriptedServer:
        server = _ScriptedServer(behaviour)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("behaviour", "kind"), [("503", "handshake_http_503"),
                                                 ("bad-accept", "handshake_failed")])
def test_connect_mode_counts_refused_upgrades(scripted, capsys, behaviour, kind) -> None:
    server = scripted(behaviour)
    code, res = _run(capsys, "connect", "--protocol", "raw", "--connections", "4",
                     "--url", f"ws://127.0.0.1:{server.server_address[1]}/")
    assert code == 1
    assert res["connect"]["established"] == 0
    assert res["errors"] == {kind: 4}


def test_connect_mode_answers_ping_and_close(scripted, capsys) -> None:
    """A held connection answers PING with its payload and echoes the server's CLOSE code."""
    server = scripted("ping-then-close")
    code, res = _run(capsys, "connect", "--protocol", "raw", "--connections", "3",
                     "--hold", "0.5", "--url", f"ws://127.0.0.1:{server.server_address[1]}/")
    assert res["connect"]["established"] == 3
    assert res["errors"] == {"closed_by_server_1001": 3} and code == 1
    close_reply = (0x8, (1001).to_bytes(2, "big"))
    assert sorted(server.replies) == sorted([(0xA, b"hi"), close_reply] * 3)


@pytest.mark.parametrize(("behaviour", "code"), [("masked", 1002), ("rsv1", 1002),
                                                 ("top-bit-length", 1002), ("oversized", 1009)])
def test_connect_mode_refuses_malformed_frames(scripted, capsys, behaviour, code) -> None:
    """The same frames the fan-out reader refuses, with the same CLOSE codes."""
    server = scripted(behaviour)
    exit_code, res = _run(capsys, "connect", "--protocol", "raw", "--connections", "2",
                          "--hold", "0.3", "--url", f"ws://127.0.0.1:{server.server_address[1]}/")
    assert res["connect"]["established"] == 2
    # The client ends the connection itself, so it is also a connection lost.
    assert res["errors"] == {"malformed": 2, "connection_lost": 2} and exit_code == 1
    assert server.replies == [(0x8, code.to_bytes(2, "big"))] * 2


def test_help_lists_examples_for_every_mode(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for mode in ("echo", "fanout", "connect"):
        assert f"%s {mode} " % "python -m tools.loadgen" in out


@pytest.mark.parametrize("codec", ["json", "tlv"])
def test_fanout_against_wirehub_serve(capsys, codec) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "wirehub", "serve", "--port", str(port)],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline, "wirehub serve did not start"
            time.sleep(0.05)
        code, res = _run(capsys, "fanout", "--subscribers", "10", "--channels", "2",
                         "--rate", "500", "--codec", codec, "--url", f"ws://127.0.0.1:{port}/ws")
        assert code == 0, res["errors"]
        # 10 subscribers over 2 channels: each publication reaches 5 of them.
        assert res["delivery"]["received"] == res["delivery"]["published"] * 5 > 0
    finally:
        proc.terminate()
        proc.wait()
