"""Who may open a connection: limits checked at TCP accept, before any HTTP parsing.

The read-ahead guard (``_ext.readahead``) asks ``Admission.admit`` for every
accepted socket. A refused socket is answered once its request arrives
(503 past ``max_connections``, 429 past the per-IP count or rate) and never
reaches picows; an oversized request head gets 431. Each refusal is counted
in ``wirehub_refusals_total{reason=...}``.

Counting happens here, not in the upgrade handler, so a flood costs the
gateway one dict lookup per socket, and a slowloris client that never
finishes its headers still counts against its IP (and is cut off by the
handshake timeout).

The handshake timeout runs here too: every socket that has not upgraded
sits in one queue ordered by deadline (the timeout is the same for all, so
arrival order is deadline order), and one timer on the gateway's clock
closes the expired ones. That is a dict insertion and a deletion per
connection instead of an event-loop timer created and cancelled for each
(picows's own, which the gateway turns off).
"""

from __future__ import annotations

from collections import OrderedDict
from http import HTTPStatus
from typing import Any

from picows import WSUpgradeResponse

from .clock import Clock, Timer
from .config import Config
from .metrics import Metrics


class RefusalReason:
    """The ``reason`` label of ``wirehub_refusals_total`` (docs/security.md)."""

    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"
    CONNECTION_RATE = "connection_rate"
    HEADER_TOO_LARGE = "header_too_large"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    ORIGIN = "origin"
    UNAUTHORIZED = "unauthorized"


def _response(status: HTTPStatus, text: str, **headers: str) -> bytes:
    response = WSUpgradeResponse.create_error_response(
        status, f"{text}\n".encode(), {"Connection": "close", "Content-Type": "text/plain", **headers})
    return bytes(response.to_bytes())


class _Peer:
    """One client IP: open connections and its new-connection token bucket."""

    __slots__ = ("open", "tokens", "updated_at")

    def __init__(self, burst: float, now: float) -> None:
        self.open = 0
        self.tokens = burst
        self.updated_at = now


# Descriptors the process needs besides its clients' sockets: the listening
# sockets, the event loop's own, standard streams, log files, the Docker
# engine's connections.
RESERVED_FILES = 64
MAX_ANSWERING = 1024


class Admission:
    """Connection limits per gateway and per client IP.

    A refused socket is held until its request arrives, so that the answer
    is read rather than lost to a reset, or until the handshake timeout. At
    most ``max_answering`` wait like that: past it, a refused socket is
    dropped at once without an answer, so a flood of sockets that never send
    a byte cannot hold more than that many descriptors beyond the limits.

    Every socket is a file. With an open-file limit, ``max_connections`` is
    lowered so that admitted and answered sockets fit under it with
    ``RESERVED_FILES`` to spare: a client past it is answered 503 and
    counted, instead of being reset unanswered when ``accept()`` fails
    (``wirehub.openfiles``).

    Args:
        config: ``max_connections``, ``max_connections_per_ip``,
            ``new_connections_per_ip_per_s``/``_burst_per_ip``, ``max_header_bytes``,
            ``handshake_timeout_s``.
        metrics: where refusals are counted.
        open_files: the process's open-file limit (``openfiles.limit()``);
            None: no limit.
        clock: the gateway's clock (``wirehub.clock``).
    """

    def __init__(self, config: Config, metrics: Metrics, open_files: int | None = None,
                 clock: Clock | None = None) -> None:
        self.max_header_bytes = config.max_header_bytes
        self.max_answering = MAX_ANSWERING
        # None: unlimited. Configured 0 means unlimited too.
        self.max_connections: int | None = config.max_connections or None
        # Set when the open-file limit, not the configuration, caps connections.
        self.capped_by_open_files = False
        if open_files is not None:
            room = max(open_files - RESERVED_FILES, 0)
            self.max_answering = min(MAX_ANSWERING, room // 8)
            fit = room - self.max_answering
            if self.max_connections is None or fit < self.max_connections:
                self.max_connections = fit
                self.capped_by_open_files = True
        self._max_per_ip = config.max_connections_per_ip
        self._rate = config.new_connections_per_ip_per_s
        self._burst = config.new_connections_burst_per_ip
        self._metrics = metrics
        self._clock = clock or Clock()
        self._peers: dict[str, _Peer] = {}
        self._handshake_timeout_s = config.handshake_timeout_s
        self._handshaking: OrderedDict[Any, float] = OrderedDict()  # guard -> deadline
        self._expiry: Timer | None = None
        self.open = 0
        self.answering = 0             # refused sockets waiting for their request
        retry_after = str(max(1, round(1 / self._rate))) if self._rate else "1"
        self._refusals = {
            RefusalReason.MAX_CONNECTIONS: _response(
                HTTPStatus.SERVICE_UNAVAILABLE, "too many connections", **{"Retry-After": "1"}),
            RefusalReason.MAX_CONNECTIONS_PER_IP: _response(
                HTTPStatus.TOO_MANY_REQUESTS, "too many connections from this address"),
            RefusalReason.CONNECTION_RATE: _response(
                HTTPStatus.TOO_MANY_REQUESTS, "new connections too fast from this address",
                **{"Retry-After": retry_after}),
        }
        self._header_too_large = _response(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
            f"request head larger than {self.max_header_bytes} bytes")

    def admit(self, transport: Any) -> str | bytes | None:
        """The peer key of an admitted socket (hand it back to ``release``),
        the response bytes that refuse it (call ``release_refused`` when it
        closes), or None: refused, and to be dropped without an answer."""
        peer = transport.get_extra_info("peername")
        key = peer[0] if isinstance(peer, tuple) else ""
        reason = self._check(key)
        if reason is None:
            return key
        self._metrics.refusals_total[reason] += 1
        if self.answering >= self.max_answering:
            return None
        self.answering += 1
        return self._refusals[reason]

    def _check(self, key: str) -> str | None:
        if self.max_connections is not None and self.open >= self.max_connections:
            return RefusalReason.MAX_CONNECTIONS
        now = self._clock.monotonic()
        state = self._peers.get(key)
        if state is None:
            state = self._peers[key] = _Peer(self._burst, now)
        if self._max_per_ip and state.open >= self._max_per_ip:
            return RefusalReason.MAX_CONNECTIONS_PER_IP
        if self._rate:
            state.tokens = min(self._burst, state.tokens + (now - state.updated_at) * self._rate)
            state.updated_at = now
            if state.tokens < 1:
                return RefusalReason.CONNECTION_RATE
            state.tokens -= 1
        state.open += 1
        self.open += 1
        return None

    def release(self, key: str) -> None:
        """An admitted socket closed."""
        self.open -= 1
        state = self._peers[key]
        state.open -= 1

    def release_refused(self) -> None:
        """A refused socket that was to be answered closed."""
        self.answering -= 1

    def refuse(self, transport: Any, response: bytes) -> None:
        """Answer a refused socket (its request has arrived) and close it."""
        transport.write(response)
        transport.close()

    def refuse_header(self, transport: Any) -> None:
        """Answer 431 and stop reading the oversized head.

        The write side is shut (the client reads the answer, then EOF) rather
        than the socket closed, so the client's unread bytes do not turn the
        answer into a reset; the handshake timeout drops whoever lingers.
        """
        self._metrics.refusals_total[RefusalReason.HEADER_TOO_LARGE] += 1
        transport.write(self._header_too_large)
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def handshake_started(self, guard: Any) -> None:
        """``guard``'s socket has ``handshake_timeout_s`` to upgrade; past it,
        ``guard.handshake_timed_out()`` is called and the refusal counted."""
        self._handshaking[guard] = self._clock.monotonic() + self._handshake_timeout_s
        if self._expiry is None:
            self._expiry = self._clock.call_later(self._handshake_timeout_s, self._expire_handshakes)

    def handshake_ended(self, guard: Any) -> None:
        """``guard``'s socket upgraded or closed: no deadline any more."""
        self._handshaking.pop(guard, None)

    @property
    def handshaking(self) -> int:
        """Sockets that have not upgraded yet and are under the handshake timeout."""
        return len(self._handshaking)

    def _expire_handshakes(self) -> None:
        self._expiry = None
        now = self._clock.monotonic()
        queue = self._handshaking
        while queue:
            guard, deadline = next(iter(queue.items()))
            if deadline > now:
                self._expiry = self._clock.call_later(deadline - now, self._expire_handshakes)
                return
            del queue[guard]
            self._metrics.refusals_total[RefusalReason.HANDSHAKE_TIMEOUT] += 1
            guard.handshake_timed_out()

    def sweep(self) -> None:
        """Forget IPs with no open connection and a refilled bucket (bounds ``_peers``)."""
        now = self._clock.monotonic()
        rate, burst = self._rate, self._burst
        idle = [key for key, state in self._peers.items()
                if state.open == 0 and (not rate or state.tokens + (now - state.updated_at) * rate >= burst)]
        for key in idle:
            del self._peers[key]

    @property
    def tracked_peers(self) -> int:
        return len(self._peers)
