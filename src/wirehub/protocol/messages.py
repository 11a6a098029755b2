"""The message model: one tagged union per direction, shared by both codecs.

Wire names are the ``tag`` of each Struct (``{"type": "subscribe", ...}``).
New fields get defaults so older clients keep working
(msgspec's schema-evolution rules).
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec

Id = Union[str, int, None]


class Command(msgspec.Struct, tag_field="type", omit_defaults=True, gc=False):
    """A client → server message."""


class Subscribe(Command, tag="subscribe"):
    channel: str
    id: Id = None
    # Source channels only (``logs:<container>``): first send the last
    # ``tail`` publications the source kept, then follow live.
    tail: Union[Annotated[int, msgspec.Meta(ge=0)], None] = None


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


class Ping(Command, tag="ping"):
    id: Id = None


class Auth(Command, tag="auth"):
    """Authenticate, or refresh the token of an authenticated connection."""

    token: str
    id: Id = None


ClientMessage = Union[Subscribe, Unsubscribe, Publish, Ping, Auth]


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


class Subscribed(Reply, tag="subscribed"):
    channel: str
    id: Id = None


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


class StreamPosition(msgspec.Struct, frozen=True, gc=False):
    """Where a publication sits in its channel's stream.

    ``offset`` grows by one per publication; ``epoch`` changes when the
    broker loses the stream (so a resuming client can tell it missed data).
    """

    offset: int
    epoch: str


class Publication(msgspec.Struct, gc=False):
    """One accepted publication, as the broker hands it to the hub."""

    channel: str
    data: bytes
    offset: int
    epoch: str
    binary: bool = False
