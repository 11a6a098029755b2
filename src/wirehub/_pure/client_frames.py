"""The client's per-frame fast path: picows frames in, whole messages out.

Nearly every frame a subscriber receives is a whole, uncompressed message
while nothing else is going on (no fragmented message open, no closing
handshake): ``FramePath.on_ws_frame`` hands those straight to
``on_message``, with the text checked as UTF-8, and every other frame to
``on_other_frame``, which ``wirehub.client_wire.ClientWire`` implements
(fragments, compression, control frames, closing); publications, once the
client has set ``publications`` and ``decode_publication``, straight to
their subscription's ``_take`` (see the compiled twin). The reference twin
of ``wirehub._ext.client_frames``.
"""

from __future__ import annotations

from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport

from .frame import is_utf8

_TEXT, _BINARY = WSMsgType.TEXT, WSMsgType.BINARY


class FramePath(WSListener):  # type: ignore[misc]
    """The fast path; subclassed (through ``client_wire.listener_class``) by a
    ``ClientWire``, which sets ``plain`` and ``max_message_bytes``."""

    plain: bool = True              # no fragmented message open, not closing
    max_message_bytes: int = 0
    # The publication path: all None until the client sets them.
    publications: dict[str, Any] | None = None
    decode_publication: Any = None
    publication_prefix: bytes | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        opcode = frame.msg_type
        if ((opcode is _TEXT or opcode is _BINARY) and frame.fin and self.plain
                and not (frame.rsv1 or frame.rsv2 or frame.rsv3)
                and frame.payload_size <= self.max_message_bytes):
            payload = frame.get_payload_as_bytes()
            if opcode is _TEXT:
                if not is_utf8(payload):
                    self.fail(1007, "text message is not valid UTF-8")
                    return
                if self.publications is not None and self.take_publication(payload):
                    return
            self.on_message(opcode, payload)
        else:
            self.on_other_frame(transport, frame)

    def take_publication(self, payload: bytes) -> bool:
        """Hand a whole text message to its subscription if it is a
        publication; False: not one (or not decodable, or no subscription)."""
        prefix = self.publication_prefix
        if payload[:len(prefix)] != prefix:
            return False
        try:
            msg = self.decode_publication(payload)
        except ValueError:   # msgspec.DecodeError and ValidationError
            return False
        sub = self.publications.get(msg.channel)
        if sub is None:
            return False
        sub._take(msg)
        return True

    # Implemented by ClientWire.
    def fail(self, code: int, reason: str) -> None:
        raise NotImplementedError

    def on_message(self, opcode: Any, payload: bytes) -> None:
        raise NotImplementedError

    def on_other_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        raise NotImplementedError
