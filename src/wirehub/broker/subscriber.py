"""The connection a node's subscriptions arrive on, read with hiredis straight from the socket.

Every publication a node receives crosses this connection, so it is read
the way the gateway reads its clients: an ``asyncio.Protocol`` whose
``data_received`` feeds hiredis and hands over every whole push in that
read, with no task step, dict or timeout per message (redis-py's ``PubSub``
costs about as much per message as the fan-out to ten subscribers does).
Writes (``SUBSCRIBE``, ``UNSUBSCRIBE``, ...) are synchronous, so they keep
their order without a lock.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import AuthenticationError, ConnectionError

logger = logging.getLogger("wirehub.broker.redis")

# Topics in one SUBSCRIBE: a node with many channels subscribes in a few commands.
TOPICS_PER_COMMAND = 1000


def pack(*args: bytes) -> bytes:
    """A command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(parts)


class SubscriptionConnection(asyncio.Protocol):
    """One connection in subscriber mode; ``on_push`` gets each push as hiredis parses it
    (``[b"message", channel, data]``, ``[b"subscribe", channel, count]``, ...)."""

    def __init__(self, on_push: Callable[[list[Any]], None]) -> None:
        self._on_push = on_push
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._handshake: asyncio.Future[Any] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, url: str, on_push: Callable[[list[Any]], None],
                   timeout_s: float) -> SubscriptionConnection:
        """Connect to the Redis ``url`` names and authenticate.

        Raises:
            ConnectionError, AuthenticationError, OSError
        """
        options = parse_url(url)
        loop = asyncio.get_running_loop()
        connection = cls(on_push)
        async with asyncio.timeout(timeout_s):
            if "path" in options:
                await loop.create_unix_connection(lambda: connection, options["path"])
            else:
                context = ssl.create_default_context() if url.startswith("rediss:") else None
                await loop.create_connection(lambda: connection, options["host"], options.get("port", 6379),
                                             ssl=context)
            if options.get("password"):
                user = (options["username"].encode(),) if options.get("username") else ()
                reply = await connection._request(pack(b"AUTH", *user, options["password"].encode()))
                if isinstance(reply, hiredis.ReplyError):
                    connection.close()
                    raise AuthenticationError(f"the broker refused the password: {reply}")
        return connection

    async def _request(self, command: bytes) -> Any:
        """Send one command before subscribing, and wait for its reply."""
        self._handshake = asyncio.get_running_loop().create_future()
        self._transport.write(command)
        try:
            return await self._handshake
        finally:
            self._handshake = None

    def send(self, verb: bytes, topics: list[str]) -> None:
        """``SUBSCRIBE`` (``PSUBSCRIBE``, ...) ``topics``, a few commands for many."""
        if self._transport is None or self._transport.is_closing():
            return  # the node subscribes everything again on its next connection
        for start in range(0, len(topics), TOPICS_PER_COMMAND):
            chunk = topics[start:start + TOPICS_PER_COMMAND]
            self._transport.write(pack(verb, *(topic.encode() for topic in chunk)))

    async def wait_closed(self) -> None:
        """Wait for the connection to end.

        Raises:
            ConnectionError: always, saying why it ended.
        """
        await asyncio.shield(self._closed)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

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
                    self._on_push(reply)
        except Exception:  # a bug must not leave the node deaf: start again with a new connection
            logger.exception("handling a message from the broker failed")
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(ConnectionError("the broker closed the connection"))
        if not self._closed.done():
            self._closed.set_exception(ConnectionError(f"the subscription connection ended: {exc or 'closed'}"))
            self._closed.exception()  # retrieved: nobody may be waiting when the node stops
