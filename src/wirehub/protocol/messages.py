"""The message model: one tagged union per direction, shared by both codecs.

Wire names are the ``tag`` of each Struct (``{"type": "subscribe", ...}``).
New fields get defaults so older clients keep working
(msgspec's schema-evolution rules).
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec

Id = Union[str, int, None]
NonNegative = msgspec.Meta(ge=0)
# Longest ``key`` a publication may carry (conflation and max_rate keep the latest per key).
MAX_KEY_LENGTH = 255
# Most publications one ``history`` request may ask for.
MAX_HISTORY_LIMIT = 1000


class StreamPosition(msgspec.Struct, frozen=True, gc=False):
    """Where a publication sits in its channel's stream.

    ``offset`` grows by one per publication; ``epoch`` changes when the
    broker loses the stream and offsets start again at 1 (so a resuming
    client can tell that the offsets it holds mean nothing any more).
    """

    offset: Annotated[int, NonNegative]
    epoch: str


class Command(msgspec.Struct, tag_field="type", omit_defaults=True, gc=False):
    """A client → server message."""


class Subscribe(Command, tag="subscribe"):
    channel: str
    id: Id = None
    # Channels with history (and source channels): first send the last
    # ``tail`` publications kept, then follow live.
    tail: Union[Annotated[int, NonNegative], None] = None
    # Resume: every publication after ``since.offset`` (docs/delivery.md).
    since: Union[StreamPosition, None] = None
    # At most this many messages a second on this subscription; between
    # two, only the latest (per publication ``key``) is kept.
    max_rate: Union[Annotated[float, msgspec.Meta(gt=0, le=1_000_000)], None] = None


class Unsubscribe(Command, tag="unsubscribe"):
    channel: str
    id: Id = None


class Publish(Command, tag="publish"):
    # ``data`` stays raw: a JSON publish is forwarded byte for byte, never
    # decoded and re-encoded (msgspec.Raw keeps the undecoded slice).
    channel: str
    data: msgspec.Raw
    id: Id = None
    exclude_self: bool = False
    # Conflation and max_rate keep the latest publication per key.
    key: Union[Annotated[str, msgspec.Meta(max_length=MAX_KEY_LENGTH)], None] = None
    # A retry with the same key on the same channel is not published again (docs/delivery.md).
    idempotency_key: Union[Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_KEY_LENGTH)], None] = None


class Ping(Command, tag="ping"):
    id: Id = None


class Auth(Command, tag="auth"):
    """Authenticate, or refresh the token of an authenticated connection."""

    token: str
    id: Id = None


class HistoryRequest(Command, tag="history"):
    """Ask for kept publications: after ``since.offset`` (oldest first), or
    with ``reverse`` before it (newest first)."""

    channel: str
    id: Id = None
    since: Union[StreamPosition, None] = None
    limit: Annotated[int, msgspec.Meta(ge=0, le=MAX_HISTORY_LIMIT)] = 100
    reverse: bool = False


FileId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]    # 16 bytes, lowercase hex
Sha256 = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]    # 32 bytes, lowercase hex


class FileBegin(Command, tag="file_begin"):
    """Start an upload, or resume one (docs/protocol.md, "File transfer").
    ``name`` is checked by the file store, which answers ``invalid_name``."""

    file_id: FileId
    name: str
    size: Annotated[int, NonNegative]
    sha256: Sha256
    chunk_size: Annotated[int, msgspec.Meta(ge=1)]
    id: Id = None
    channel: Union[str, None] = None


class FileEnd(Command, tag="file_end"):
    file_id: FileId
    id: Id = None


class FileChunk(msgspec.Struct, gc=False):
    """One chunk of an upload, from a TLV ``chunk`` record (binary frames only):
    ``data`` is a view into the received message."""

    file_id: str
    index: int
    count: int
    data: memoryview


ClientMessage = Union[Subscribe, Unsubscribe, Publish, Ping, Auth, HistoryRequest, FileBegin, FileEnd]


class CustomMessage(msgspec.Struct, gc=False):
    """An application-defined message type, dispatched to ``Gateway.on(type)``.

    ``body`` is the whole decoded object (JSON) or a field-name → value dict
    (TLV, where ``data`` is ``bytes``).
    """

    type: str
    body: dict[str, Any]
    id: Id = None


class Reply(msgspec.Struct, tag_field="type", omit_defaults=True, gc=False):
    """A server → client message."""


class Welcome(Reply, tag="welcome"):
    client_id: str
    server: str


class Range(msgspec.Struct, frozen=True, gc=False):
    """Offsets ``from`` to ``to``, both included."""

    first: int = msgspec.field(name="from")
    last: int = msgspec.field(name="to")


class Subscribed(Reply, tag="subscribed"):
    channel: str
    id: Id = None
    # The channel's position when the subscription started: live delivery
    # covers every publication after it. None for a pattern.
    position: Union[StreamPosition, None] = None
    # Set when the subscribe asked to resume (``since``): whether everything
    # after ``since.offset`` follows; if not, why and which offsets cannot.
    recovered: Union[bool, None] = None
    reason: Union[str, None] = None
    missed: Union[Range, None] = None


class Unsubscribed(Reply, tag="unsubscribed"):
    channel: str
    id: Id = None
    # Set when the server ended the subscription (``forbidden``: a refreshed
    # token no longer covers the channel).
    reason: Union[str, None] = None


class Published(Reply, tag="published"):
    channel: str
    offset: int
    id: Id = None
    epoch: Union[str, None] = None
    # True: the publish repeated an idempotency key; this is the first
    # one's position, and nothing was published again. Absent otherwise.
    duplicate: Union[bool, None] = None


class Message(Reply, tag="message"):
    channel: str
    offset: int
    data: msgspec.Raw


class Pong(Reply, tag="pong"):
    id: Id = None


class Authenticated(Reply, tag="authenticated"):
    sub: str
    id: Id = None
    exp: Union[int, None] = None


class AuthFailed(Reply, tag="auth_error"):
    code: str
    error: str
    id: Id = None


class TokenExpiring(Reply, tag="token_expiring"):
    """Sent ahead of ``exp``: answer with a fresh ``auth`` to stay connected."""

    exp: int


class Error(Reply, tag="error"):
    code: str
    error: str
    id: Id = None
    # A file transfer's error: which file, and which chunk.
    file_id: Union[str, None] = None
    index: Union[int, None] = None


class FileReady(Reply, tag="file_ready"):
    """The answer to ``file_begin``: send every chunk not in ``have``."""

    file_id: str
    have: list[tuple[int, int]]
    chunk_count: int
    window: int
    max_bytes_per_s: int
    burst_bytes: int
    id: Id = None


class FileAck(Reply, tag="file_ack"):
    file_id: str
    index: int


class FileDone(Reply, tag="file_done"):
    file_id: str
    name: str
    size: int
    sha256: str
    id: Id = None
    channel: Union[str, None] = None


class Lagged(Reply, tag="lagged"):
    """Sent before the next publication of ``channel`` when some were not
    delivered (slow-consumer policy or ``max_rate``): ``dropped`` of them,
    with offsets from ``from`` to ``to``; ``history`` may still hold them."""

    channel: str
    dropped: int
    first: int = msgspec.field(name="from")
    last: int = msgspec.field(name="to")


class HistoryEntry(msgspec.Struct, omit_defaults=True, gc=False):
    """One kept publication in a ``history`` reply: ``data`` for a JSON
    publication, ``data_b64`` (base64) for a binary one."""

    offset: int
    data: Union[msgspec.Raw, None] = None
    data_b64: Union[str, None] = None
    key: Union[str, None] = None


class History(Reply, tag="history"):
    """The answer to a ``history`` request; ``more``: the page was cut at ``limit``."""

    channel: str
    position: StreamPosition
    publications: list[HistoryEntry]
    more: bool
    id: Id = None


# A publication's data: JSON text or binary bytes. A client's JSON publish
# keeps the decoder's ``msgspec.Raw`` view into the received message (no
# copy); both are buffers.
PublicationData = Union[bytes, msgspec.Raw]


class Publication(msgspec.Struct, gc=False):
    """One accepted publication, as the broker hands it to the hub and keeps it in history."""

    channel: str
    data: PublicationData
    offset: int
    epoch: str
    binary: bool = False
    key: Union[str, None] = None
    # When the broker accepted it (its clock), for ``history_ttl_s``.
    time: float = 0.0
    # The framed ``message`` for this publication, built once by the hub
    # and kept for every subscriber that recovers it from history.
    frame: Union[bytes, None] = None
