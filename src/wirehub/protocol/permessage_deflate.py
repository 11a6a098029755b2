"""Negotiate permessage-deflate (RFC 7692), with no I/O: the server's side,
and (at the end) the client's.

The server hands :func:`negotiate` the client's ``Sec-WebSocket-Extensions``
header values and its own :class:`DeflateOptions`; it gets back the agreed
:class:`DeflateParams` and the header value to answer with, or ``None`` to
answer without the header (and send uncompressed). The agreed parameters
then configure the codec (``wirehub._speedups.Deflater``/``Inflater``)::

    agreed = negotiate(request.headers.getall("Sec-WebSocket-Extensions", []), options)
    if agreed is not None:
        params, header_value = agreed
        deflater = Deflater(**params.deflater_kwargs(options))
        inflater = Inflater(**params.inflater_kwargs(), max_message_bytes=...)

When the handshake fails, and when an offer is only declined
--------------------------------------------------------------
RFC 7692 §5 lists why a server *declines* an offer: a parameter not defined
for offers, an invalid value, a duplicate parameter, or a configuration the
server does not support. Declining is not failing: the server goes on to the
client's next offer and, when none is acceptable, answers without
permessage-deflate. RFC 7692 fails the connection only on the client side
(a bad *response*). So malformed offers, such as an unknown parameter,
``server_max_window_bits=7``, ``=16``, ``=08`` or ``=x``, two
``server_no_context_takeover`` or ``client_no_context_takeover=1``, are
declined here, never raised.

:class:`NegotiationError` is raised, on the server's side, for one thing
only: a header value that does not parse as the ``Sec-WebSocket-Extensions``
grammar of RFC 6455 §9.1 (say ``permessage-deflate;;`` or ``a b``). That is a
malformed handshake request, which RFC 6455 §4.2.1 answers with an HTTP
error such as ``400 Bad Request``. The caller maps it to that response.

The client's side
-----------------
A client sends :data:`CLIENT_OFFER` and checks the server's answer with
:func:`accept_response`. Here a bad answer is not declined but fatal: an
extension the client did not offer (RFC 6455 §4.1), a parameter not defined
for responses, a duplicate, or an invalid value (RFC 7692 §5, §7.1) raise
:class:`NegotiationError`, and the client must fail the connection.

What is agreed, parameter by parameter (RFC 7692 §7.1)
-------------------------------------------------------
* ``server_no_context_takeover``: in the response when the client offered
  it (§7.1.1.1, MUST) or ``options.server_no_context_takeover`` is set.
* ``client_no_context_takeover``: in the response when the client offered
  it (so it becomes binding, §7.1.1.2, and our inflater may forget the
  window between messages) or ``options.client_no_context_takeover`` is set.
* ``server_max_window_bits``: the offered value, lowered to
  ``options.server_max_window_bits``; always answered when offered (§7.1.2.1,
  MUST), otherwise only when the option is below 15. An offer whose agreed
  value would be 8 is declined: zlib cannot compress raw deflate with a
  256-byte window (it silently used 512 bytes before zlib 1.2.9 and refuses
  since), and answering 8 while compressing with 9 could break a strict peer.
* ``client_max_window_bits``: without a value (the client may honour a limit),
  answered with ``options.client_max_window_bits`` when that is below 15;
  with a value, lowered to the option and answered only when lowered (the
  client keeps its own value otherwise, §7.1.2.2). When the client did not
  offer it at all, the server must not send it, so the agreed value is 15
  whatever the option says (the inflater then needs the full 32 KiB window).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CLIENT_OFFER",
    "EXTENSION_NAME",
    "DeflateOptions",
    "DeflateParams",
    "NegotiationError",
    "accept_response",
    "negotiate",
    "parse_extensions",
]

EXTENSION_NAME = "permessage-deflate"

_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_WINDOW_BITS_VALUES = {str(bits): bits for bits in range(8, 16)}  # no sign, no leading zero
# The smallest window zlib can compress raw deflate with (see module docstring).
_MIN_COMPRESS_WINDOW_BITS = 9


class NegotiationError(ValueError):
    """``Sec-WebSocket-Extensions`` does not parse (RFC 6455 §9.1).

    Answer the handshake with ``400 Bad Request`` (RFC 6455 §4.2.1).
    """


@dataclass(frozen=True)
class DeflateOptions:
    """How the server compresses, and which limits it asks of the client.

    Args:
        enabled: offer-accepting at all; ``False`` makes :func:`negotiate`
            return ``None``.
        level: zlib compression level, -1 (zlib's default, 6) to 9.
        mem_level: zlib memLevel, 1 to 9: 8 costs 128 KiB of compressor state,
            each step down halves it (see ``wirehub._pure.deflate``).
        server_max_window_bits: largest window we compress with, 9 to 15
            (8 is refused: zlib cannot do it).
        client_max_window_bits: largest window we ask the client to compress
            with, 8 to 15; only binding when the client offers the parameter.
        server_no_context_takeover: always compress each message on its own
            (what a shared fan-out compressor needs).
        client_no_context_takeover: ask the client to do the same, so the
            inflater holds no window between messages.
        threshold_bytes: messages shorter than this are sent uncompressed
            (RSV1 clear); used by the sender, not by the negotiation.
    """

    enabled: bool = True
    level: int = 6
    mem_level: int = 8
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15
    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    threshold_bytes: int = 1024

    def __post_init__(self) -> None:
        if not -1 <= self.level <= 9:
            raise ValueError(f"level must be between -1 and 9, got {self.level}")
        if not 1 <= self.mem_level <= 9:
            raise ValueError(f"mem_level must be between 1 and 9, got {self.mem_level}")
        if not _MIN_COMPRESS_WINDOW_BITS <= self.server_max_window_bits <= 15:
            raise ValueError(
                "server_max_window_bits must be between 9 and 15 (zlib cannot compress "
                f"raw deflate with 8), got {self.server_max_window_bits}"
            )
        if not 8 <= self.client_max_window_bits <= 15:
            raise ValueError(
                f"client_max_window_bits must be between 8 and 15, got {self.client_max_window_bits}"
            )
        if self.threshold_bytes < 0:
            raise ValueError(f"threshold_bytes must be >= 0, got {self.threshold_bytes}")


@dataclass(frozen=True)
class DeflateParams:
    """What the server and the client agreed (RFC 7692 §7.1), from the server's side.

    ``server_*`` configure our compressor, ``client_*`` our decompressor.
    """

    server_no_context_takeover: bool
    client_no_context_takeover: bool
    server_max_window_bits: int
    client_max_window_bits: int

    def deflater_kwargs(self, options: DeflateOptions) -> dict:
        """Return the keyword arguments of the server's ``Deflater``."""
        return {
            "level": options.level,
            "mem_level": options.mem_level,
            "window_bits": self.server_max_window_bits,
            "no_context_takeover": self.server_no_context_takeover,
        }

    def inflater_kwargs(self) -> dict:
        """Return the window arguments of the server's ``Inflater`` (add the limits)."""
        return {
            "window_bits": self.client_max_window_bits,
            "no_context_takeover": self.client_no_context_takeover,
        }


# --- Sec-WebSocket-Extensions grammar (RFC 6455 §9.1) -----------------------------


Param = tuple[str, str | None]


def parse_extensions(header_values: list[str]) -> list[tuple[str, list[Param]]]:
    """Parse ``Sec-WebSocket-Extensions`` header values into offers, in order.

    Names are lower-cased (tokens compare case-insensitively); a quoted value
    is unquoted. Empty list elements (``a, , b``) are skipped, as RFC 7230
    §7 allows.

    Args:
        header_values: every ``Sec-WebSocket-Extensions`` field, in order.

    Returns:
        ``[(extension_name, [(param_name, value_or_None), ...]), ...]``.

    Raises:
        NegotiationError: a value does not follow the grammar.
    """
    offers: list[tuple[str, list[Param]]] = []
    for value in header_values:
        offers.extend(_Parser(value).extension_list())
    return offers


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> NegotiationError:
        return NegotiationError(
            f"invalid Sec-WebSocket-Extensions {self.text!r}: {what} at position {self.pos}"
        )

    def skip_ows(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def token(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _TCHARS:
            self.pos += 1
        if self.pos == start:
            raise self.error("expected a token")
        return self.text[start : self.pos]

    def quoted_string(self) -> str:
        self.pos += 1  # opening quote
        out = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\\":
                self.pos += 1
                if self.pos == len(self.text):
                    break
                char = self.text[self.pos]
            out.append(char)
            self.pos += 1
        raise self.error("unterminated quoted string")

    def extension_list(self) -> list[tuple[str, list[Param]]]:
        offers = []
        while True:
            self.skip_ows()
            if self.peek() == ",":  # empty list element
                self.pos += 1
                continue
            if not self.peek():
                break
            offers.append(self.extension())
            self.skip_ows()
            if not self.peek():
                break
            if self.peek() != ",":
                raise self.error("expected ',' or ';'")
            self.pos += 1
        if not offers:
            raise self.error("no extension")
        return offers

    def extension(self) -> tuple[str, list[Param]]:
        name = self.token().lower()
        params: list[Param] = []
        while True:
            self.skip_ows()
            if self.peek() != ";":
                return name, params
            self.pos += 1
            self.skip_ows()
            param = self.token().lower()
            self.skip_ows()
            value = None
            if self.peek() == "=":
                self.pos += 1
                self.skip_ows()
                value = self.quoted_string() if self.peek() == '"' else self.token()
            params.append((param, value))


# --- the server's decision (RFC 7692 §5, §7.1) ------------------------------------------


def negotiate(header_values: list[str], options: DeflateOptions) -> tuple[DeflateParams, str] | None:
    """Accept the client's first acceptable permessage-deflate offer.

    Args:
        header_values: the client's ``Sec-WebSocket-Extensions`` values, in
            order (several fields, each possibly a list of offers).
        options: the server's configuration.

    Returns:
        ``(agreed parameters, value of the response's Sec-WebSocket-Extensions)``,
        or ``None`` when compression is disabled or no offer is acceptable:
        then answer without the header and never set RSV1.

    Raises:
        NegotiationError: a header value does not parse; answer 400.
    """
    if not options.enabled:
        return None  # the header is not even parsed: nothing to fail on
    offers = parse_extensions(header_values)
    for name, params in offers:
        if name != EXTENSION_NAME:
            continue
        agreed = _accept(params, options)
        if agreed is not None:
            return agreed
    return None


_NO_VALUE = object()


def _accept(params: list[Param], options: DeflateOptions) -> tuple[DeflateParams, str] | None:
    """Return the agreement for one offer, or None to decline it (§5)."""
    offered: dict[str, object] = {}
    for name, value in params:
        if name in offered:
            return None  # §5: duplicate parameter
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None  # §7.1.1: these have no value
            offered[name] = True
        elif name == "server_max_window_bits":
            if value not in _WINDOW_BITS_VALUES:
                return None  # §7.1.2.1: 8..15, no leading zero; a value is required
            offered[name] = _WINDOW_BITS_VALUES[value]
        elif name == "client_max_window_bits":
            if value is None:
                offered[name] = _NO_VALUE  # §7.1.2.2: "I can limit my window"
            elif value in _WINDOW_BITS_VALUES:
                offered[name] = _WINDOW_BITS_VALUES[value]
            else:
                return None
        else:
            return None  # §5: not defined for offers

    server_no_context_takeover = bool(
        offered.get("server_no_context_takeover") or options.server_no_context_takeover
    )
    client_no_context_takeover = bool(
        offered.get("client_no_context_takeover") or options.client_no_context_takeover
    )

    server_bits = options.server_max_window_bits
    offered_server_bits = offered.get("server_max_window_bits")
    if offered_server_bits is not None:
        server_bits = min(server_bits, offered_server_bits)  # type: ignore[type-var]
        if server_bits < _MIN_COMPRESS_WINDOW_BITS:
            return None  # §5: a configuration we cannot honour (zlib, window 8)

    offered_client_bits = offered.get("client_max_window_bits")
    answer_client_bits = False
    if offered_client_bits is None:
        client_bits = 15  # §7.1.2.2: we may not ask for a limit
    elif offered_client_bits is _NO_VALUE:
        client_bits = options.client_max_window_bits
        answer_client_bits = client_bits < 15
    else:
        client_bits = min(options.client_max_window_bits, offered_client_bits)  # type: ignore[type-var]
        answer_client_bits = client_bits < offered_client_bits  # type: ignore[operator]

    agreed = DeflateParams(
        server_no_context_takeover=server_no_context_takeover,
        client_no_context_takeover=client_no_context_takeover,
        server_max_window_bits=server_bits,
        client_max_window_bits=client_bits,
    )
    parts = [EXTENSION_NAME]
    if server_no_context_takeover:
        parts.append("server_no_context_takeover")
    if client_no_context_takeover:
        parts.append("client_no_context_takeover")
    if offered_server_bits is not None or server_bits < 15:
        parts.append(f"server_max_window_bits={server_bits}")
    if answer_client_bits:
        parts.append(f"client_max_window_bits={client_bits}")
    return agreed, "; ".join(parts)


# --- the client's side (RFC 7692 §5, §7.1) ----------------------------------------------

# What wirehub.Client offers: no limits asked of the server, and the client
# may be asked for a smaller window (a server that wants one says so:
# Autobahn's 13.3-13.6 do). client_no_context_takeover needs no offer: a
# server may always ask for it (§7.1.1.2).
CLIENT_OFFER = f"{EXTENSION_NAME}; client_max_window_bits"


def accept_response(header_values: list[str], offered: bool = True) -> DeflateParams | None:
    """Check the server's ``Sec-WebSocket-Extensions`` answer to :data:`CLIENT_OFFER`.

    Args:
        header_values: the response's ``Sec-WebSocket-Extensions`` fields.
        offered: whether the request carried :data:`CLIENT_OFFER` (without
            it, any extension in the answer is an error).

    Returns:
        What was agreed (``server_*`` configure the client's inflater,
        ``client_*`` its deflater), or ``None``: no extension, nothing is
        compressed either way.

    Raises:
        NegotiationError: the answer is not acceptable (an extension not
            offered, two of them, a parameter that is unknown, repeated,
            carries a value it must not or lacks one it needs, window bits
            outside 8-15 or with a leading zero); fail the connection.
    """
    if not header_values:
        return None
    extensions = parse_extensions(header_values)
    if not offered or len(extensions) != 1 or extensions[0][0] != EXTENSION_NAME:
        names = ", ".join(name for name, _ in extensions)
        raise NegotiationError(f"the server answered with extensions we did not offer (or more than one): {names}")
    agreed: dict[str, object] = {}
    for name, value in extensions[0][1]:
        if name in agreed:
            raise NegotiationError(f"{name} appears twice in the server's answer")
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                raise NegotiationError(f"{name} takes no value, the server sent {value!r}")
            agreed[name] = True
        elif name in ("server_max_window_bits", "client_max_window_bits"):
            # §7.1.2: both take a value in a response, 8 to 15, no leading zero.
            if value not in _WINDOW_BITS_VALUES:
                raise NegotiationError(f"{name}={value} in the server's answer: 8 to 15 expected")
            agreed[name] = _WINDOW_BITS_VALUES[value]
        else:
            raise NegotiationError(f"the server's answer has a parameter we do not know: {name}")
    return DeflateParams(
        server_no_context_takeover=bool(agreed.get("server_no_context_takeover")),
        client_no_context_takeover=bool(agreed.get("client_no_context_takeover")),
        server_max_window_bits=agreed.get("server_max_window_bits", 15),  # type: ignore[arg-type]
        client_max_window_bits=agreed.get("client_max_window_bits", 15),  # type: ignore[arg-type]
    )
