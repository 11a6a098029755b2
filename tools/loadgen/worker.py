"""One load-generating process: open its share of connections, drive them, report.

The runner talks to each worker over a pipe in phases::

    worker → ready      connections are open (and subscribed)
    runner → go         start_ns, warmup_end_ns, end_ns (CLOCK_MONOTONIC is shared
                        by all processes on the machine, so one schedule fits all)
    worker → progress   every 0.5 s while running
    worker → stopped    what each sender sent (so the runner knows what to expect)
    runner → expect     messages sent per channel / per publisher
    worker → report     counters, histogram, per-subscriber anomalies, CPU

Connection problems are counted by kind (``connect_refused``,
``closed_by_server_1013``…) and a few messages are kept as samples; nothing
that the server or the network does can raise out of a worker.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import time
import traceback
from collections import Counter
from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import Any

import uvloop
from picows import WSCloseCode, WSError, WSMsgType, ws_connect

from . import payload
from ._speedups import (
    IMPLEMENTATION,
    KIND_RAW,
    KIND_WIREHUB_JSON,
    KIND_WIREHUB_TLV,
    Recorder,
    Sender,
    SocketReader,
    Subscriber,
)
from .config import Config, channel, mine, publisher_channels, subscriber_channel
from .handshake import HandshakeFailed, Holder, Target

PROGRESS_INTERVAL_S = 0.5
# uvloop timers have 1 ms resolution; the fixed-rate schedule itself is exact
# because each message carries its intended send time.
TICK_S = 0.001
DRAIN_POLL_S = 0.05
MAX_ERROR_SAMPLES = 5
MAX_WORST_SUBSCRIBERS = 20
COUNTERS = ("received", "received_bytes", "other_received", "sent", "acked", "malformed",
            "error_replies", "server_closes")


def worker_main(cfg: Config, index: int, pipe: Connection) -> None:
    """Process entry point (multiprocessing target); the runner has lifted the
    open-file limit it inherits."""
    try:
        uvloop.run(Worker(cfg, index, pipe).run())
    except BaseException:  # a bug in the loadgen: let the runner print it
        try:
            pipe.send(("fatal", index, traceback.format_exc()))
        except OSError:
            pass


class _Session:
    """Handles the rare frames of one wirehub connection (welcome, subscribed, error)."""

    __slots__ = ("count_errors", "subscribed", "welcome", "worker")

    def __init__(self, worker: Worker, count_errors: bool) -> None:
        loop = asyncio.get_running_loop()
        self.worker = worker
        self.welcome: asyncio.Future[None] = loop.create_future()
        self.subscribed: asyncio.Future[str | None] = loop.create_future()
        # Senders count error replies on the hot path; subscribers do it here.
        self.count_errors = count_errors

    def on_control(self, listener: Any, msg_type: WSMsgType, data: bytes) -> None:
        msg = payload.decode_control(data, msg_type == WSMsgType.BINARY)
        kind = msg.get("type")
        if kind == "welcome":
            if not self.welcome.done():
                self.welcome.set_result(None)
        elif kind == "subscribed":
            if not self.subscribed.done():
                self.subscribed.set_result(None)
        elif kind == "error":
            text = f"error reply {msg.get('code')}: {msg.get('error')}"
            if self.count_errors:
                self.worker.error(f"error_reply_{msg.get('code')}", text)
            else:
                self.worker.sample(text)
            if not self.subscribed.done():
                self.subscribed.set_result(text)
        elif not msg:
            self.worker.error("malformed", f"undecodable frame: {data[:80]!r}")
        else:
            self.worker.error("unexpected_frame", f"unexpected frame: {data[:80]!r}")


class Worker:
    """Connections, schedule and bookkeeping of one process."""

    def __init__(self, cfg: Config, index: int, pipe: Connection) -> None:
        self.cfg = cfg
        self.index = index
        self.pipe = pipe
        self.recorder = Recorder()
        self.kind = (KIND_RAW if cfg.protocol == "raw"
                     else KIND_WIREHUB_TLV if cfg.codec == "tlv" else KIND_WIREHUB_JSON)
        self.subscribers: list[tuple[int, Any]] = []
        self.senders: list[tuple[int, Any]] = []
        self.holders: list[Holder] = []
        self.reader: Any = None             # a SocketReader once set-up is done
        self.unwelcomed: list[tuple[Holder, asyncio.Future[None]]] = []
        self.errors: Counter[str] = Counter()
        self.samples: list[str] = []
        self.open = 0
        self.closing = False
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.sem = asyncio.Semaphore(max(1, -(-cfg.concurrency // cfg.procs)))

    # -- bookkeeping ------------------------------------------------------

    def sample(self, text: str) -> None:
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(text)

    def error(self, kind: str, text: str) -> None:
        self.errors[kind] += 1
        self.sample(text)

    def _on_lost(self, listener: Any) -> None:
        self.open -= 1
        if self.closing:
            return
        if listener.close_code >= 0:
            self.error(f"closed_by_server_{listener.close_code}",
                       f"server closed a connection with code {listener.close_code}")
        else:
            self.error("connection_lost", "connection lost without a CLOSE frame")

    def _counters(self) -> dict[str, Any]:
        c = {name: getattr(self.recorder, name) for name in COUNTERS}
        c["open"] = self.open
        c["errors"] = sum(self.errors.values())
        t = os.times()
        c["cpu_s"] = t.user + t.system
        c["mono_ns"] = time.monotonic_ns()
        return c

    def send(self, *msg: Any) -> None:
        self.pipe.send(msg)

    async def receive(self, expected: str) -> tuple[Any, ...]:
        msg = await self.inbox.get()
        if msg[0] != expected:
            raise RuntimeError(f"worker {self.index}: expected {expected!r}, got {msg[0]!r}")
        return msg

    def _read_pipe(self) -> None:
        try:
            while self.pipe.poll():
                self.inbox.put_nowait(self.pipe.recv())
        except EOFError:  # the runner is gone: stop
            asyncio.get_running_loop().stop()

    # -- connections ------------------------------------------------------

    def _connect_failed(self, exc: BaseException) -> None:
        """Count a connection that never opened, by what went wrong."""
        if isinstance(exc, HandshakeFailed):
            self.error(exc.kind, str(exc))
        elif isinstance(exc, WSError):
            self.error("handshake_failed", f"handshake: {exc}")
        elif isinstance(exc, ConnectionRefusedError):
            self.error("connect_refused", f"connect: {exc}")
        elif isinstance(exc, ConnectionResetError):
            self.error("connect_reset", f"connect: {exc}")
        elif isinstance(exc, TimeoutError):
            self.error("connect_timeout", "connect: timed out")
        else:
            self.error(f"connect_{type(exc).__name__}", f"connect: {exc}")

    async def _open(self, listener: Any, subscribe_to: str | None = None) -> float | None:
        """Connect one listener (and wait for wirehub's ``welcome``, then
        ``subscribed`` if it subscribes); return the handshake time in
        seconds, None on failure."""
        cfg = self.cfg
        session = None
        if cfg.protocol == "wirehub":
            session = _Session(self, count_errors=not isinstance(listener, Sender))
            listener.control = session.on_control
        async with self.sem:
            t0 = time.monotonic()
            try:
                # asyncio.timeout, not wait_for: no task per connection.
                async with asyncio.timeout(cfg.connect_timeout_s):
                    # uvloop's own transports: ~1.5x the handshakes per client
                    # CPU-second of picows's default (aiofastnet) path.
                    transport, _ = await ws_connect(
                        lambda: listener, cfg.url, enable_auto_pong=True, use_aiofastnet=False,
                        websocket_handshake_timeout=cfg.connect_timeout_s)
            except (OSError, WSError) as exc:
                self._connect_failed(exc)
                return None
            elapsed = time.monotonic() - t0
        if transport.is_disconnected:
            # picows returns normally when the peer resets during the upgrade.
            self.error("connect_reset", "connection reset during the handshake")
            return None
        self.open += 1
        listener.lost = self._on_lost
        if session is None:
            return elapsed
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                await asyncio.shield(session.welcome)
                if subscribe_to is not None:
                    request, binary = payload.wirehub_subscribe(subscribe_to, cfg.codec)
                    listener.transport.send(WSMsgType.BINARY if binary else WSMsgType.TEXT, request)
                    if await asyncio.shield(session.subscribed) is not None:
                        return None
        except TimeoutError:
            if not listener.disconnected:
                self.error("setup_timeout", "no welcome/subscribed reply in time")
            return None
        return elapsed

    async def _check_welcomes(self) -> None:
        """Wait (once, up to the connect timeout) for the welcomes ``_hold`` did not await."""
        pending, self.unwelcomed = self.unwelcomed, []
        waiting = [welcome for _, welcome in pending]
        if waiting:
            await asyncio.wait(waiting, timeout=self.cfg.connect_timeout_s)
        for listener, welcome in pending:
            # A connection lost meanwhile is already counted by _on_lost.
            if not welcome.done() and not listener.disconnected:
                self.error("setup_timeout", "no welcome reply in time")

    async def _open_all(self, jobs: Iterable[tuple[Any, str | None]]) -> list[float | None]:
        return await asyncio.gather(*(self._open(lst, ch) for lst, ch in jobs))

    def _sender(self, pub: int, rate: float) -> Any:
        cfg = self.cfg
        if cfg.mode == "echo":
            tpl = (payload.raw_message(cfg.size, cfg.binary) if cfg.protocol == "raw"
                   else payload.wirehub_ping(cfg.size, cfg.codec))
            return Sender(self.kind, self.recorder, pub_id=pub, template=tpl.payload,
                          binary=tpl.binary, header_offset=tpl.header_offset, ack_type=b"pong",
                          record_latency=True, window=cfg.inflight, rate=rate)
        chans = publisher_channels(cfg, pub)
        tpl = (payload.raw_message(cfg.size, cfg.binary) if cfg.protocol == "raw"
               else payload.wirehub_publish(channel(cfg, chans[0]), cfg.size, cfg.codec))
        return Sender(self.kind, self.recorder, pub_id=pub, template=tpl.payload,
                      binary=tpl.binary, header_offset=tpl.header_offset, id_offset=tpl.id_offset,
                      channel_offset=tpl.channel_offset, channel_first=chans.start,
                      channel_step=chans.step, channel_count=len(chans), ack_type=b"published",
                      window=cfg.window, rate=rate)

    async def setup(self) -> None:
        """Open (and subscribe) every connection of this worker."""
        cfg = self.cfg
        rate = cfg.rate / cfg.senders if cfg.rate > 0 and cfg.senders else 0.0
        for i in mine(cfg.receivers, self.index, cfg.procs):
            self.subscribers.append((i, Subscriber(self.kind, self.recorder, cfg.streams)))
        for j in mine(cfg.senders, self.index, cfg.procs):
            self.senders.append((j, self._sender(j, rate)))
        sub_channel = None if cfg.protocol == "raw" else lambda i: channel(
            cfg, subscriber_channel(cfg, i))
        jobs = [(lst, sub_channel(i) if sub_channel else None) for i, lst in self.subscribers]
        jobs += [(lst, None) for _, lst in self.senders]
        await self._open_all(jobs)
        if not cfg.url.lower().startswith("wss:"):
            self._hand_over_sockets()

    def _hand_over_sockets(self) -> None:
        """Let the ``SocketReader`` read every connection's socket.

        Called once set-up is done: each connection has its ``welcome`` and
        ``subscribed`` replies (wirehub) or its upgrade (raw), and no sender
        has started, so nothing is in flight to it and picows holds no
        partial frame. TLS connections are left to picows: the reader would
        see the bytes on the wire.
        """
        reader = self.reader = SocketReader()
        for _, lst in [*self.subscribers, *self.senders]:
            if lst.transport is not None and not lst.disconnected:
                hand_over(reader, lst)
        asyncio.get_running_loop().add_reader(reader.fileno(), reader.on_ready)

    async def _hold(self, target: Target) -> float | None:
        """Open one ``connect``-mode connection; return the handshake time, None on failure.

        wirehub's ``welcome`` is not awaited here but by ``_check_welcomes``,
        once for all, so the handshake rate does not include a per-connection wait.
        """
        if self.cfg.protocol == "wirehub":
            session = _Session(self, count_errors=True)
            holder = Holder(target, session.on_control, self.error)
        else:
            session = None
            holder = Holder(target, self._unexpected_frame, self.error)
        self.holders.append(holder)
        async with self.sem:
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(self.cfg.connect_timeout_s):
                    await target.connect(holder)
                    await holder.upgraded
            except (OSError, HandshakeFailed) as exc:
                holder.abort()
                self._connect_failed(exc)
                return None
            elapsed = time.monotonic() - t0
        self.open += 1
        holder.lost = self._on_lost
        if session is not None:
            self.unwelcomed.append((holder, session.welcome))
        return elapsed

    def _unexpected_frame(self, holder: Holder, msg_type: WSMsgType, data: bytes) -> None:
        self.error("unexpected_frame", f"unexpected frame: {data[:80]!r}")

    async def connect_and_hold(self) -> dict[str, Any]:
        """``connect`` mode: open connections as fast as allowed, then hold them."""
        cfg = self.cfg
        target = Target.from_url(cfg.url)
        t0 = time.monotonic()
        times = await asyncio.gather(*(self._hold(target)
                                       for _ in mine(cfg.connections, self.index, cfg.procs)))
        connect_s = time.monotonic() - t0
        await self._check_welcomes()
        for t in times:
            if t is not None:
                self.recorder.record_ns(int(t * 1e9))
        await asyncio.sleep(cfg.hold_s)
        return {"connect_s": connect_s}

    async def close_all(self) -> None:
        """Close every connection with 1000 and wait (briefly) until they are gone."""
        self.closing = True
        listeners = [lst for _, lst in self.subscribers] + [lst for _, lst in self.senders]
        # The reader lets go of the sockets before their transports close them.
        if self.reader is not None:
            asyncio.get_running_loop().remove_reader(self.reader.fileno())
            self.reader.close()
            self.reader = None
        for lst in listeners:
            if lst.transport is not None and not lst.disconnected:
                lst.transport.send_close(WSCloseCode.OK)
                lst.transport.disconnect()
        for holder in self.holders:
            holder.close(WSCloseCode.OK)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and (
                any(lst.transport is not None and not lst.disconnected for lst in listeners)
                or any(h.transport is not None and not h.disconnected for h in self.holders)):
            await asyncio.sleep(0.02)

    # -- phases -----------------------------------------------------------

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            self.send("progress", self.index, self._counters())

    async def _ticks(self) -> None:
        senders = [s for _, s in self.senders]
        while True:
            for s in senders:
                s.tick()
            await asyncio.sleep(TICK_S)

    async def _drain(self, expected: dict[str, list[int]]) -> float:
        """Wait until subscribers got everything sent and senders got their acks."""
        cfg = self.cfg
        targets = []
        for i, sub in self.subscribers:
            if cfg.protocol == "raw":
                targets.append((sub, expected["publishers"]))
            else:
                targets.append((sub, [expected["channels"][subscriber_channel(cfg, i)]]))
        t0 = time.monotonic()
        deadline = t0 + cfg.drain_s
        while time.monotonic() < deadline:
            pending = any(not sub.disconnected and any(sub.highest(s) < e for s, e in enumerate(exp))
                          for sub, exp in targets)
            pending = pending or any(not s.disconnected and s.in_flight for _, s in self.senders)
            if not pending:
                break
            await asyncio.sleep(DRAIN_POLL_S)
        for sub, exp in targets:
            sub.finish(exp)
        return time.monotonic() - t0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._read_pipe)
        cfg = self.cfg
        await self.setup()
        # Keep collector pauses out of the measurement: what setup built is
        # frozen, and the collector stays off until the measured window ends
        # (in connect mode every handshake allocates; the collections cost
        # the client ~9 % of its CPU there). A few seconds of cycles are cheap.
        gc.collect()
        gc.freeze()
        gc.disable()
        self.send("ready", self.index, {"open": self.open})
        _, go = await self.receive("go")
        progress = asyncio.create_task(self._progress())
        extra: dict[str, Any] = {}
        if cfg.mode == "connect":
            await _sleep_until(go["start_ns"])
            before, cpu0 = self._counters(), os.times()
            extra = await self.connect_and_hold()
            after, cpu1 = self._counters(), os.times()
        else:
            await _sleep_until(go["start_ns"])
            n = max(cfg.senders, 1)
            for j, s in self.senders:
                # Stagger fixed-rate senders over one interval so they do not fire in lockstep.
                offset = int(1e9 / s.rate * j / n) if s.rate > 0 else 0
                s.start(go["start_ns"] + offset)
            ticker = asyncio.create_task(self._ticks()) if cfg.rate > 0 else None
            await _sleep_until(go["warmup_end_ns"])
            self.recorder.reset_histogram()
            before, cpu0 = self._counters(), os.times()
            await _sleep_until(go["end_ns"])
            after, cpu1 = self._counters(), os.times()
            for _, s in self.senders:
                s.stop()
            if ticker is not None:
                ticker.cancel()
        gc.enable()
        sent = {j: s.channel_counts() for j, s in self.senders}
        self.send("stopped", self.index, sent)
        _, expected = await self.receive("expect")
        extra["drain_s"] = await self._drain(expected)
        progress.cancel()
        report = self._report(before, after, self._counters(), cpu0, cpu1)
        report.update(extra)
        # A client too busy to run its timers measures a shifted, shorter window.
        report["timer_lag_s"] = max(before["mono_ns"] - go["warmup_end_ns"],
                                    after["mono_ns"] - go["end_ns"], 0) / 1e9
        if cfg.mode == "connect":
            report["timer_lag_s"] = 0.0
        await self.close_all()
        loop.remove_reader(self.pipe.fileno())
        self.send("report", self.index, report)

    def _report(self, before: dict[str, Any], after: dict[str, Any], final: dict[str, Any],
                cpu0: os.times_result, cpu1: os.times_result) -> dict[str, Any]:
        """Rates come from ``before``..``after`` (the window), totals from ``final``."""
        rec = self.recorder
        window_s = (after["mono_ns"] - before["mono_ns"]) / 1e9
        subs = []
        for i, sub in self.subscribers:
            subs.append({"subscriber": i, "received": sub.received, "missing": sub.missing,
                         "duplicates": sub.duplicates, "out_of_order": sub.out_of_order})
        anomalous = [s for s in subs if s["missing"] or s["duplicates"] or s["out_of_order"]]
        anomalous.sort(key=lambda s: -(abs(s["missing"]) + s["duplicates"] + s["out_of_order"]))
        return {
            "pid": os.getpid(),
            "implementation": IMPLEMENTATION,
            "window_s": window_s,
            "delta": {k: after[k] - before[k] for k in COUNTERS},
            "total": {k: final[k] for k in COUNTERS},
            "open": self.open,
            "targets": len(self.subscribers) + len(self.senders) + len(self.holders),
            "histogram": {"counts": rec.histogram_counts(), "total": rec.hist_total,
                          "min": rec.hist_min if rec.hist_total else 0, "max": rec.hist_max,
                          "sum": rec.hist_sum},
            "subscribers": {
                "count": len(subs),
                "received_min": min((s["received"] for s in subs), default=0),
                "received_max": max((s["received"] for s in subs), default=0),
                "missing": sum(s["missing"] for s in subs),
                "duplicates": sum(s["duplicates"] for s in subs),
                "out_of_order": sum(s["out_of_order"] for s in subs),
                "with_anomalies": len(anomalous),
                "worst": anomalous[:MAX_WORST_SUBSCRIBERS],
            },
            "errors": dict(self.errors),
            "error_samples": self.samples,
            "cpu": {"user_s": cpu1.user - cpu0.user, "sys_s": cpu1.system - cpu0.system,
                    "wall_s": window_s,
                    "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        }


def hand_over(reader: Any, listener: Any) -> None:
    """Move the reading of ``listener``'s socket from picows to ``reader``.

    picows keeps the transport (and writes through it, and closes it); its
    reading is paused.
    """
    underlying = listener.transport.underlying_transport
    reader.adopt(listener, underlying.get_extra_info("socket").fileno())
    underlying.pause_reading()


async def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)
