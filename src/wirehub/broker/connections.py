"""The broker's own connections to Redis, read with hiredis straight from the socket.

Every publication a node makes or receives crosses one of these, so they
are read the way the gateway reads its clients: an ``asyncio.Protocol``
whose ``data_received`` feeds hiredis and hands over every whole reply in
that read, with no task step, dict or timeout per reply (redis-py's
``PubSub`` costs about as much per message as the fan-out to ten
subscribers does, and its per-reply ``read_response`` as much again per
publish). Writes are synchronous, so they keep their order without a lock.

- ``SubscriptionConnection``: subscriber mode; every push goes to ``on_push``.
- ``PipelineConnection``: commands written as they come, each reply handed
  to the answer of the command it belongs to (Redis answers in order), with
  no round trip waited for between two writes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError

logger = logging.getLogger("wirehub.broker.redis")

# Topics in one SUBSCRIBE: a node with many channels subscribes in a few commands.
TOPICS_PER_COMMAND = 1000


def pack(*args: bytes) -> bytes:
    """A command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(parts)


class RespConnection(asyncio.Protocol):
    """One connection to Redis: ``open`` connects and authenticates; a subclass
    says what becomes of the replies (``_received``)."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._handshake: asyncio.Future[Any] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def _connect(self, url: str, timeout_s: float, select_db: bool) -> None:
        """Connect to the Redis ``url`` names, authenticate and (``select_db``) select its database.

        Raises:
            ConnectionError, AuthenticationError, ResponseError, OSError, TimeoutError
        """
        options = parse_url(url)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            if "path" in options:
                await loop.create_unix_connection(lambda: self, options["path"])
            else:
                context = ssl.create_default_context() if url.startswith("rediss:") else None
                await loop.create_connection(lambda: self, options["host"], options.get("port", 6379), ssl=context)
            try:
                if options.get("password"):
                    user = (options["username"].encode(),) if options.get("username") else ()
                    reply = await self.request(pack(b"AUTH", *user, options["password"].encode()))
                    if isinstance(reply, hiredis.ReplyError):
                        raise AuthenticationError(f"the broker refused the password: {reply}")
                if select_db and int(options.get("db", 0)):
                    reply = await self.request(pack(b"SELECT", b"%d" % int(options["db"])))
                    if isinstance(reply, hiredis.ReplyError):
                        raise ResponseError(f"the broker refused database {options['db']}: {reply}")
            except BaseException:
                self.close()
                raise

    async def request(self, command: bytes) -> Any:
        """Send one command while nothing else is in flight, and wait for its reply."""
        self._handshake = asyncio.get_running_loop().create_future()
        self._transport.write(command)
        try:
            return await self._handshake
        finally:
            self._handshake = None

    @property
    def closed(self) -> bool:
        return self._closed.done()

    async def wait_closed(self) -> None:
        """Wait for the connection to end.

        Raises:
            ConnectionError: always, saying why it ended.
        """
        await asyncio.shield(self._closed)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _received(self, reply: Any) -> None:
        raise NotImplementedError

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                if self._handshake is not None and not self._handshake.done():
                    self._handshake.set_result(reply)
                else:
                    self._received(reply)
        except Exception:  # a bug must not leave the node deaf or mute: start again with a new connection
            logger.exception("handling a reply from the broker failed")
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(ConnectionError("the broker closed the connection"))
        if not self._closed.done():
            self._closed.set_exception(ConnectionError(f"the connection to the broker ended: {exc or 'closed'}"))
            self._closed.exception()  # retrieved: nobody may be waiting when the node stops


class SubscriptionConnection(RespConnection):
    """One connection in subscriber mode; ``on_push`` gets each push as hiredis parses it
    (``[b"message", channel, data]``, ``[b"subscribe", channel, count]``, ...)."""

    def __init__(self, on_push: Callable[[list[Any]], None]) -> None:
        super().__init__()
        self._on_push = on_push
        self._pongs: collections.deque[asyncio.Future[None]] = collections.deque()

    @classmethod
    async def open(cls, url: str, on_push: Callable[[list[Any]], None], timeout_s: float) -> SubscriptionConnection:
        """Connect and authenticate (pub/sub ignores databases).

        Raises:
            ConnectionError, AuthenticationError, OSError, TimeoutError
        """
        connection = cls(on_push)
        await connection._connect(url, timeout_s, select_db=False)
        return connection

    def send(self, verb: bytes, topics: list[str]) -> None:
        """``SUBSCRIBE`` (``PSUBSCRIBE``, ...) ``topics``, a few commands for many."""
        if self._transport is None or self._transport.is_closing():
            return  # the node subscribes everything again on its next connection
        for start in range(0, len(topics), TOPICS_PER_COMMAND):
            chunk = topics[start:start + TOPICS_PER_COMMAND]
            self._transport.write(pack(verb, *(topic.encode() for topic in chunk)))

    async def barrier(self) -> None:
        """Wait until Redis has done every command sent so far (a ``PING``
        answered after them: Redis runs one connection's commands in order).

        Raises:
            ConnectionError: the connection ended first.
        """
        pong = asyncio.get_running_loop().create_future()
        self._pongs.append(pong)
        self._transport.write(pack(b"PING"))
        await asyncio.wait([pong, self._closed], return_when=asyncio.FIRST_COMPLETED)
        if not pong.done():
            pong.cancel()
            raise ConnectionError("the connection to the broker ended")

    def _received(self, reply: Any) -> None:
        # ``[b"pong", b""]`` once subscribed to something, ``PONG`` before.
        if self._pongs and (reply == b"PONG" or (type(reply) is list and reply[0] == b"pong")):
            pong = self._pongs.popleft()
            if not pong.done():
                pong.set_result(None)
            return
        self._on_push(reply)


class PipelineConnection(RespConnection):
    """Commands written as they come; each reply goes to ``on_reply`` with its command's token.

    ``waiting`` holds the tokens of the commands sent and not yet replied
    to, oldest first, each with the loop time by which its reply is due
    (``due``: the oldest's). When the connection ends, every waiting token
    gets a ``ConnectionError`` as its reply, then ``on_lost`` is called.
    """

    def __init__(self, on_reply: Callable[[Any, Any], None], on_lost: Callable[[Exception], None]) -> None:
        super().__init__()
        self._on_reply = on_reply
        self._on_lost = on_lost
        self.waiting: collections.deque[tuple[Any, float]] = collections.deque()

    @classmethod
    async def open(cls, url: str, timeout_s: float, on_reply: Callable[[Any, Any], None],
                   on_lost: Callable[[Exception], None]) -> PipelineConnection:
        """Connect, authenticate and select the URL's database.

        Raises:
            ConnectionError, AuthenticationError, ResponseError, OSError, TimeoutError
        """
        connection = cls(on_reply, on_lost)
        await connection._connect(url, timeout_s, select_db=True)
        return connection

    def send(self, commands: list[bytes], tokens: list[Any], due: float) -> None:
        """Write ``commands`` (one write); the reply to ``commands[i]`` goes to
        ``on_reply`` with ``tokens[i]``, and is due by loop time ``due``.

        Raises:
            ConnectionError: the connection has ended (nothing was written).
        """
        if self._transport is None or self._transport.is_closing():
            raise ConnectionError("the connection to the broker has ended")
        self._transport.write(b"".join(commands))
        self.waiting.extend((token, due) for token in tokens)

    @property
    def due(self) -> float | None:
        """When the oldest reply waited for is due (loop time), or None."""
        return self.waiting[0][1] if self.waiting else None

    def abort(self) -> None:
        """End the connection now, whatever it still had to write (a broker that stopped answering)."""
        if self._transport is not None:
            self._transport.abort()

    def _received(self, reply: Any) -> None:
        token, _ = self.waiting.popleft()
        self._on_reply(token, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        waiting, self.waiting = self.waiting, collections.deque()
        error = ConnectionError(f"the connection to the broker ended: {exc or 'closed'}")
        for token, _ in waiting:
            self._on_reply(token, error)
        self._on_lost(error)
