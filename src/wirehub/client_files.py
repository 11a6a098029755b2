"""``Client.upload``: one file sent chunk by chunk, resumed after every
reconnect (docs/protocol.md, "File transfer"; docs/clients.md, "Uploads").

An upload is a loop of attempts. Each attempt sends ``file_begin``, whose
``file_ready`` lists the chunks the gateway already holds, sends the others
with at most ``window`` unacknowledged and no faster than the connection's
inbound rate limit, waits for their acknowledgements, and sends
``file_end``. An attempt ends early when the connection drops (the next one
starts once the client has reconnected), and when the gateway refuses a
chunk for its rate (``rate_limited``) or reports chunks missing at the end:
the gateway answers ``file_begin`` only after the chunks it took are
written, so the next attempt's ``have`` is exact and only what is missing
goes again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .clock import Clock

if TYPE_CHECKING:
    from .client import Client

DEFAULT_CHUNK_BYTES = 256 * 1024
HASH_BLOCK_BYTES = 1 << 20
# Of the gateway's byte rate, what the chunks may use: the rest is for the
# connection's other messages (the limit counts every inbound byte).
RATE_SHARE = 0.9
# After a message was refused for the connection's rate, the pause before
# the next attempt (the gateway's bucket refills meanwhile).
REFUSED_PAUSE_S = 0.5
# ``file_end`` answered ``incomplete_file`` or ``unknown_file`` this many
# times in a row by attempts that sent nothing: a gateway contradicting its
# own ``have``, which beginning again cannot mend.
MAX_FRUITLESS_ATTEMPTS = 3

Source = bytes | bytearray | memoryview | str | os.PathLike[str]
Progress = Callable[[int, int], Any]


@dataclass(frozen=True, slots=True)
class UploadResult:
    """A complete upload, as the gateway verified it (``file_done``), and what it took."""

    file_id: str
    name: str
    size: int
    sha256: str
    channel: str | None
    chunks_sent: int   # over every attempt: chunk_count when nothing was sent twice
    attempts: int


class _Attempt(Exception):
    """This attempt cannot go on (connection dropped, a chunk refused for rate): begin again."""


class _Pacer:
    """A token bucket on the client's side of the gateway's inbound byte limit."""

    def __init__(self, clock: Clock, rate: float, burst: float) -> None:
        self._clock = clock
        self._rate = rate * RATE_SHARE
        self._burst = burst * RATE_SHARE
        self._tokens = self._burst
        self._at = clock.monotonic()

    async def take(self, amount: int) -> None:
        if self._rate <= 0:
            return
        now = self._clock.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        self._tokens -= amount
        if self._tokens < 0:
            await self._clock.sleep(-self._tokens / self._rate)


class Upload:
    """One file on its way; ``Client.upload`` drives it, ``Client._dispatch``
    feeds it acknowledgements and chunk errors."""

    def __init__(self, client: Client, source: Source, *, name: str | None, channel: str | None,
                 file_id: bytes | None, chunk_size: int, on_progress: Progress | None) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._data: memoryview | None = memoryview(source).cast("B")
            self._path: Path | None = None
            self.size = len(self._data)
            self.name = name or "upload.bin"
        else:
            self._data = None
            self._path = Path(source)
            self.size = self._path.stat().st_size
            self.name = name or self._path.name
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self._client = client
        self.channel = channel
        self.file_id = file_id if file_id is not None else uuid.uuid4().bytes
        if len(self.file_id) != 16:
            raise ValueError("file_id must be 16 bytes")
        self.chunk_size = chunk_size
        self.chunk_count = -(-self.size // chunk_size)
        self.chunks_sent = 0
        self.attempts = 0
        self._on_progress = on_progress
        self._unacked: set[int] = set()
        self._acked_bytes = 0
        self._event = asyncio.Event()
        self._interrupted = False
        self._refused = False
        self._failure: BaseException | None = None

    # -- fed by the client -------------------------------------------------------------

    def acked(self, index: int) -> None:
        if index in self._unacked:
            self._unacked.discard(index)
            self._acked_bytes += self._chunk_bytes(index)
            if self._on_progress is not None:
                self._on_progress(self._acked_bytes, self.size)
        self._event.set()

    def failed(self, error: BaseException) -> None:
        self._failure = error
        self._event.set()

    def interrupted(self, refused: bool = False) -> None:
        """The connection dropped, or (``refused``) a message was refused for
        the connection's rate, maybe a chunk or this upload's request: this
        attempt ends."""
        self._interrupted = True
        self._refused = self._refused or refused
        self._event.set()

    # -- the upload --------------------------------------------------------------------

    async def run(self) -> UploadResult:
        from .client import ConnectionLost, ServerError  # the client imports this module

        client = self._client
        sha256 = await self._digest()
        begin = {"type": "file_begin", "file_id": self.file_id.hex(), "name": self.name, "size": self.size,
                 "sha256": sha256, "chunk_size": self.chunk_size}
        if self.channel is not None:
            begin["channel"] = self.channel
        fruitless = 0
        while True:
            if self._refused:
                self._refused = False
                await client._clock.sleep(REFUSED_PAUSE_S)
            await client._wait_connected()
            self.attempts += 1
            self._interrupted = False
            sent_before = self.chunks_sent
            try:
                ready = await self._request(dict(begin))
                self._unacked.clear()
                self._acked_bytes = sum(self._chunk_bytes(i) for a, b in ready["have"] for i in range(a, b + 1))
                await self._send_missing(ready)
                done = await self._request({"type": "file_end", "file_id": self.file_id.hex()})
            except (_Attempt, ConnectionLost):
                continue
            except ServerError as exc:
                if exc.code in ("incomplete_file", "unknown_file"):   # begin again: have says what is missing
                    fruitless = 0 if self.chunks_sent > sent_before else fruitless + 1
                    if fruitless < MAX_FRUITLESS_ATTEMPTS:
                        continue
                if exc.code == "rate_limited":   # file_begin or file_end refused for the rate
                    self._refused = True
                    continue
                raise
            return UploadResult(done["file_id"], done["name"], done["size"], done["sha256"], done.get("channel"),
                                self.chunks_sent, self.attempts)

    async def _request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """``msg``'s answer, unless this attempt ends first (a gateway older
        than this client refuses a request for the rate without its ``id``,
        and never answers it)."""
        answer = asyncio.ensure_future(self._client._send(msg, "request"))
        try:
            while not answer.done():
                self._event.clear()
                self._check()
                woken = asyncio.ensure_future(self._event.wait())
                await asyncio.wait([answer, woken], return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
            return answer.result()
        finally:
            answer.cancel()

    async def _send_missing(self, ready: dict[str, Any]) -> None:
        held = bytearray(self.chunk_count)
        for first, last in ready["have"]:
            held[first:last + 1] = b"\x01" * (last - first + 1)
        window = max(1, ready["window"])
        pacer = _Pacer(self._client._clock, ready["max_bytes_per_s"], ready["burst_bytes"])
        for index in range(self.chunk_count):
            if held[index]:
                continue
            while len(self._unacked) >= window:
                await self._wait()
            data = await self._read(index)
            await pacer.take(len(data))
            self._check()
            self._unacked.add(index)
            self.chunks_sent += 1
            self._client._send_chunk(self.file_id, index, self.chunk_count, data)
        while self._unacked:
            await self._wait()

    async def _wait(self) -> None:
        self._event.clear()
        self._check()
        await self._event.wait()
        self._check()

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._interrupted:
            raise _Attempt()

    def _chunk_bytes(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    async def _read(self, index: int) -> bytes | memoryview:
        start = index * self.chunk_size
        if self._data is not None:
            return self._data[start:start + self.chunk_size]
        return await asyncio.get_running_loop().run_in_executor(None, _read_at, self._path, start,
                                                                self._chunk_bytes(index))

    async def _digest(self) -> str:
        if self._data is not None:
            return hashlib.sha256(self._data).hexdigest()
        return await asyncio.get_running_loop().run_in_executor(None, _file_digest, self._path)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as file:
        return os.pread(file.fileno(), size, offset)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()
