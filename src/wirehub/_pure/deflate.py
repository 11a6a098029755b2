"""permessage-deflate codec (RFC 7692 §7.2): the readable twin of ``wirehub._ext.deflate``.

Both modules have the same API and pass the same tests
(``tests/test_deflate.py``). This one uses the stdlib :mod:`zlib`; the
compiled one drives a ``z_stream`` directly. Import the pair through
``wirehub._speedups``, never this module directly.

Memory per connection (zlib's own accounting, ``zconf.h``):

* a :class:`Deflater` holds ``(1 << (window_bits + 2)) + (1 << (mem_level + 9))``
  bytes of deflate state, plus about 6 KiB: 256 KiB at the defaults
  (``window_bits=15``, ``mem_level=8``), 4 KiB + 64 KiB at
  ``window_bits=10, mem_level=7``. That is why the fan-out path shares one
  compressor with no context takeover instead of one per connection.
* an :class:`Inflater` holds ``1 << window_bits`` bytes of window plus about
  7 KiB of inflate state: 39 KiB at ``window_bits=15``.

Neither class is thread-safe; each belongs to one connection (or, for a
shared no-context-takeover compressor, to one event loop).
"""

from __future__ import annotations

import zlib

__all__ = ["Deflater", "Inflater", "MessageTooBig", "InvalidData", "ZLIB_RUNTIME_VERSION"]

ZLIB_RUNTIME_VERSION: str = zlib.ZLIB_RUNTIME_VERSION

# RFC 7692 §7.2.1: the four octets a Z_SYNC_FLUSH ends with, removed from
# each compressed message and appended again before inflating it (§7.2.2).
_TAIL = b"\x00\x00\xff\xff"

# max_ratio only trips once a message has inflated past this many bytes, so
# small, very compressible messages (a run of spaces, zeroed structs) pass.
RATIO_FLOOR_BYTES = 1024 * 1024


class MessageTooBig(Exception):
    """A compressed message inflates past ``max_message_bytes`` or ``max_ratio``.

    The connection must be failed with close code 1009 (RFC 6455 §7.4.1).
    """


class InvalidData(Exception):
    """The compressed data is not a valid raw deflate stream.

    The connection must be failed; RFC 7692 names no close code, websockets
    uses 1002 (protocol error).
    """


def _check_window_bits(window_bits: int) -> None:
    if not 8 <= window_bits <= 15:
        raise ValueError(f"window_bits must be between 8 and 15, got {window_bits}")


def _zlib_window_bits(window_bits: int) -> int:
    # zlib rejects a raw deflate window of 8 bits (256 bytes) since 1.2.9 and
    # silently used 9 before that, so 9 is the smallest window zlib can
    # *compress* with; and an inflater sized 8 would reject the 512-byte
    # distances such a "window 8" peer (or an old zlib) really emits. Both
    # sides therefore run 8 as 9, like zlib itself did; the negotiation
    # (wirehub.protocol.permessage_deflate) never agrees to compress with 8.
    return max(window_bits, 9)


class Deflater:
    """Compress whole messages for permessage-deflate (RFC 7692 §7.2.1).

    Args:
        level: zlib level, 0 (store) to 9, or -1 for zlib's default (6).
        mem_level: 1 to 9; memory for the match finder, see the module docstring.
        window_bits: 8 to 15, the agreed ``*_max_window_bits`` for our side
            (8 is run as 9, see ``_zlib_window_bits``).
        no_context_takeover: reset the LZ77 window after every message
            (the agreed ``*_no_context_takeover`` for our side).
    """

    __slots__ = ("level", "mem_level", "window_bits", "no_context_takeover", "_compressor")

    def __init__(
        self,
        *,
        level: int = 6,
        mem_level: int = 8,
        window_bits: int = 15,
        no_context_takeover: bool = False,
    ) -> None:
        if not -1 <= level <= 9:
            raise ValueError(f"level must be between -1 and 9, got {level}")
        if not 1 <= mem_level <= 9:
            raise ValueError(f"mem_level must be between 1 and 9, got {mem_level}")
        _check_window_bits(window_bits)
        # Read-only by convention (read-only attributes in the compiled twin).
        self.level = level
        self.mem_level = mem_level
        self.window_bits = _zlib_window_bits(window_bits)  # the window zlib really uses
        self.no_context_takeover = bool(no_context_takeover)
        self._compressor = self._new()

    def _new(self):
        return zlib.compressobj(self.level, zlib.DEFLATED, -self.window_bits, self.mem_level)

    def compress(self, payload) -> bytes:
        """Compress one whole message; return the payload for its frame(s).

        Send the result with RSV1 set on the first frame (RFC 7692 §6). The
        stream is flushed with Z_SYNC_FLUSH and the trailing ``00 00 ff ff``
        removed (§7.2.1), so the result may be split into frames anywhere.

        Args:
            payload: the message, any bytes-like object.

        Returns:
            The compressed payload (never empty: at least one byte).
        """
        data = self._compressor.compress(payload) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        if self.no_context_takeover:
            # §7.2.1: with *_no_context_takeover, start each message afresh.
            self._compressor = self._new()
        # Z_SYNC_FLUSH always ends with an empty stored block.
        assert data.endswith(_TAIL), data[-8:]
        return data[:-4]


class Inflater:
    """Inflate permessage-deflate messages, frame by frame, within limits (RFC 7692 §7.2.2).

    Call :meth:`feed` once per frame of a compressed message (the first
    frame had RSV1 set), with ``fin`` of that frame; join the returned pieces.

    Args:
        window_bits: 8 to 15, the agreed ``*_max_window_bits`` of the peer.
        no_context_takeover: the peer resets its window after each message,
            so ours is reset too (and could be freed between messages).
        max_message_bytes: the largest inflated message accepted. Output
            never grows past it: zlib is stopped as soon as it is exceeded.
        max_ratio: when above 0, also reject a message whose output exceeds
            ``max_ratio`` times its compressed input once it is past
            ``RATIO_FLOOR_BYTES`` (1 MiB), i.e. a decompression bomb.

    After :class:`MessageTooBig` or :class:`InvalidData` the stream is in an
    unknown state: fail the connection and drop the Inflater.
    """

    __slots__ = (
        "window_bits",
        "no_context_takeover",
        "max_message_bytes",
        "max_ratio",
        "_decompressor",
        "_out_bytes",
        "_in_bytes",
        "_broken",
    )

    def __init__(
        self,
        *,
        window_bits: int = 15,
        no_context_takeover: bool = False,
        max_message_bytes: int,
        max_ratio: int = 0,
    ) -> None:
        _check_window_bits(window_bits)
        if max_message_bytes < 0:
            raise ValueError(f"max_message_bytes must be >= 0, got {max_message_bytes}")
        if max_ratio < 0:
            raise ValueError(f"max_ratio must be >= 0, got {max_ratio}")
        # Read-only by convention (read-only attributes in the compiled twin).
        self.window_bits = _zlib_window_bits(window_bits)
        self.no_context_takeover = bool(no_context_takeover)
        self.max_message_bytes = max_message_bytes
        self.max_ratio = max_ratio
        self._decompressor = zlib.decompressobj(-self.window_bits)
        self._out_bytes = 0  # inflated so far in the current message
        self._in_bytes = 0  # compressed bytes fed so far in the current message
        self._broken = False

    def _allowance(self) -> int:
        """How many more bytes the current message may inflate to."""
        limit = self.max_message_bytes
        if self.max_ratio > 0:
            limit = min(limit, max(RATIO_FLOOR_BYTES, self.max_ratio * self._in_bytes))
        return limit - self._out_bytes

    def _too_big(self) -> MessageTooBig:
        self._broken = True
        if self._out_bytes > self.max_message_bytes or self.max_ratio == 0:
            return MessageTooBig(
                f"message inflates past max_message_bytes={self.max_message_bytes}"
            )
        return MessageTooBig(
            f"message inflates past max_ratio={self.max_ratio} times its "
            f"{self._in_bytes} compressed bytes"
        )

    def feed(self, fragment, fin: bool) -> bytes:
        """Inflate the payload of one frame of a compressed message.

        Args:
            fragment: the frame's payload (bytes-like), as received.
            fin: the frame's FIN bit; ``00 00 ff ff`` is appended (§7.2.2)
                and the per-message limits are reset after it.

        Returns:
            The bytes this frame inflated to (possibly empty).

        Raises:
            MessageTooBig: the message so far exceeds ``max_message_bytes``,
                or ``max_ratio`` (fail the connection with 1009).
            InvalidData: the data is not valid deflate (fail the connection).
        """
        if self._broken:
            raise InvalidData("the inflater failed earlier; the connection must be closed")
        data = bytes(fragment)
        self._in_bytes += len(data)
        out = []
        # The frame's bytes, then the 00 00 ff ff tail as a separate input,
        # exactly as the compiled twin feeds zlib: where damaged data fails
        # (too big or invalid) depends on how the input is cut.
        tail_fed = False
        while True:
            if not data:
                if not fin or tail_fed:
                    break
                data, tail_fed = _TAIL, True
            allowance = self._allowance()
            try:
                # max_length bounds what zlib allocates: one byte more than
                # allowed is enough to know the limit is exceeded.
                chunk = self._decompressor.decompress(data, allowance + 1)
            except zlib.error as exc:
                self._broken = True
                raise InvalidData(str(exc)) from None
            self._out_bytes += len(chunk)
            if len(chunk) > allowance:
                raise self._too_big()
            out.append(chunk)
            if self._decompressor.eof:
                # The peer ended its stream with a BFINAL block (§7.2.3.4)
                # and must start a new one for whatever follows (it had to
                # reset its compressor too). The 00 00 ff ff we append
                # (§7.2.2) is no block on its own: drop what is left of it,
                # or skip it when the frame ended with the stream.
                data = b"" if tail_fed else self._decompressor.unused_data
                if not data:
                    tail_fed = True
                self._decompressor = zlib.decompressobj(-self.window_bits)
            else:
                # Output stopped short of allowance + 1, so zlib consumed all input.
                data = self._decompressor.unconsumed_tail
        if fin:
            self._out_bytes = 0
            self._in_bytes = 0
            if self.no_context_takeover:
                self._decompressor = zlib.decompressobj(-self.window_bits)
        return b"".join(out)
