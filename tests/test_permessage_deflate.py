"""permessage-deflate negotiation (RFC 7692 §5, §7.1): offers in, exact answers out."""

from __future__ import annotations

import pytest

from wirehub._ext import deflate as ext_deflate
from wirehub._pure import deflate as pure_deflate
from wirehub.protocol.permessage_deflate import (
    DeflateOptions,
    DeflateParams,
    NegotiationError,
    negotiate,
    parse_extensions,
)

PMD = "permessage-deflate"
DEFAULT = DeflateOptions()
# What a fan-out server wants: one shared compressor, small client windows.
SHARED = DeflateOptions(
    server_no_context_takeover=True,
    client_no_context_takeover=True,
    server_max_window_bits=12,
    client_max_window_bits=10,
)


def answer(offer: str | list[str], options: DeflateOptions = DEFAULT) -> str | None:
    result = negotiate([offer] if isinstance(offer, str) else offer, options)
    return None if result is None else result[1]


class TestResponseHeader:
    """The exact Sec-WebSocket-Extensions value answered for each offer."""

    @pytest.mark.parametrize(
        ("offer", "expected"),
        [
            (PMD, PMD),
            ("permessage-deflate; client_max_window_bits", PMD),
            ("permessage-deflate; client_max_window_bits=10", PMD),
            ("permessage-deflate; server_no_context_takeover", f"{PMD}; server_no_context_takeover"),
            ("permessage-deflate; client_no_context_takeover", f"{PMD}; client_no_context_takeover"),
            ("permessage-deflate; server_max_window_bits=10", f"{PMD}; server_max_window_bits=10"),
            ("permessage-deflate; server_max_window_bits=15", f"{PMD}; server_max_window_bits=15"),
            ("permessage-deflate; server_max_window_bits=9", f"{PMD}; server_max_window_bits=9"),
            # What browsers send.
            ("permessage-deflate; client_max_window_bits", PMD),
            # Autobahn 0.10.9's default offer.
            ("permessage-deflate; client_no_context_takeover; client_max_window_bits",
             f"{PMD}; client_no_context_takeover"),
            # Autobahn 13.5: requestNoContextTakeover, requestMaxWindowBits=9.
            ("permessage-deflate; client_no_context_takeover; client_max_window_bits; "
             "server_no_context_takeover; server_max_window_bits=9",
             f"{PMD}; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9"),
            # Quoted values unquote (RFC 6455 §9.1), names compare case-insensitively.
            ('permessage-deflate; server_max_window_bits="10"', f"{PMD}; server_max_window_bits=10"),
            ("Permessage-Deflate; Server_No_Context_Takeover", f"{PMD}; server_no_context_takeover"),
            ("permessage-deflate ;server_max_window_bits = 11 ", f"{PMD}; server_max_window_bits=11"),
        ],
    )
    def test_default_options(self, offer, expected):
        assert answer(offer) == expected

    @pytest.mark.parametrize(
        ("offer", "expected"),
        [
            (PMD,
             f"{PMD}; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12"),
            ("permessage-deflate; client_max_window_bits",
             f"{PMD}; server_no_context_takeover; client_no_context_takeover; "
             "server_max_window_bits=12; client_max_window_bits=10"),
            ("permessage-deflate; client_max_window_bits=9",
             f"{PMD}; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12"),
            ("permessage-deflate; client_max_window_bits=14",
             f"{PMD}; server_no_context_takeover; client_no_context_takeover; "
             "server_max_window_bits=12; client_max_window_bits=10"),
            ("permessage-deflate; server_max_window_bits=15",
             f"{PMD}; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12"),
            ("permessage-deflate; server_max_window_bits=9",
             f"{PMD}; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9"),
        ],
    )
    def test_shared_compressor_options(self, offer, expected):
        assert answer(offer, SHARED) == expected


class TestAgreedParams:
    def test_defaults(self):
        params, _ = negotiate([PMD], DEFAULT)
        assert params == DeflateParams(False, False, 15, 15)

    def test_client_limits_apply_only_when_offered(self):
        # §7.1.2.2: without client_max_window_bits in the offer we cannot ask
        # for a smaller client window, so the inflater needs 15.
        params, _ = negotiate([PMD], SHARED)
        assert params == DeflateParams(True, True, 12, 15)
        params, _ = negotiate([f"{PMD}; client_max_window_bits"], SHARED)
        assert params.client_max_window_bits == 10
        params, _ = negotiate([f"{PMD}; client_max_window_bits=9"], SHARED)
        assert params.client_max_window_bits == 9

    def test_offered_takeover_flags(self):
        params, _ = negotiate(
            [f"{PMD}; server_no_context_takeover; client_no_context_takeover"], DEFAULT
        )
        assert params.server_no_context_takeover and params.client_no_context_takeover

    def test_codec_kwargs(self):
        params, _ = negotiate([f"{PMD}; client_max_window_bits"], SHARED)
        assert params.deflater_kwargs(SHARED) == {
            "level": 6,
            "mem_level": 8,
            "window_bits": 12,
            "no_context_takeover": True,
        }
        assert params.inflater_kwargs() == {"window_bits": 10, "no_context_takeover": True}

    @pytest.mark.parametrize("impl", [ext_deflate, pure_deflate], ids=["ext", "pure"])
    def test_agreed_params_drive_the_codec(self, impl):
        options = DeflateOptions(server_max_window_bits=10, mem_level=5)
        params, _ = negotiate([f"{PMD}; client_max_window_bits; server_no_context_takeover"], options)
        deflater = impl.Deflater(**params.deflater_kwargs(options))
        inflater = impl.Inflater(**params.inflater_kwargs(), max_message_bytes=1 << 20)
        message = b"wirehub " * 1000
        assert inflater.feed(deflater.compress(message), True) == message


class TestDeclined:
    """RFC 7692 §5: the server declines such offers (and moves on), never fails."""

    @pytest.mark.parametrize(
        "offer",
        [
            "permessage-deflate; unknown_param",
            "permessage-deflate; unknown=1",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; server_max_window_bits=+9",
            "permessage-deflate; server_max_window_bits=x",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=ten",
            "permessage-deflate; server_no_context_takeover=1",
            'permessage-deflate; client_no_context_takeover="true"',
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
            # Valid, but zlib cannot compress with a 256-byte window.
            "permessage-deflate; server_max_window_bits=8",
            # Other extensions are not ours.
            "x-webkit-deflate-frame",
            "deflate-frame; no_context_takeover",
        ],
    )
    def test_declined(self, offer):
        assert negotiate([offer], DEFAULT) is None

    def test_next_offer_after_a_declined_one(self):
        offers = [
            "permessage-deflate; server_max_window_bits=8, permessage-deflate; bogus",
            "permessage-deflate; client_no_context_takeover, permessage-deflate",
        ]
        assert answer(offers) == f"{PMD}; client_no_context_takeover"

    def test_first_acceptable_offer_wins(self):
        offer = "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        assert answer(offer) == f"{PMD}; server_max_window_bits=10"

    def test_other_extensions_are_skipped(self):
        offer = "x-unknown; a=1, permessage-deflate; server_no_context_takeover"
        assert answer(offer) == f"{PMD}; server_no_context_takeover"

    def test_no_header(self):
        assert negotiate([], DEFAULT) is None

    def test_disabled(self):
        assert negotiate([PMD], DeflateOptions(enabled=False)) is None
        # Disabled means the header is not even read.
        assert negotiate(["permessage-deflate;;"], DeflateOptions(enabled=False)) is None


class TestMalformedHeader:
    """RFC 6455 §4.2.1/§9.1: an unparsable header fails the handshake (400)."""

    @pytest.mark.parametrize(
        "value",
        [
            "",
            ",",
            "permessage-deflate;",
            "permessage-deflate;;",
            "permessage-deflate; =10",
            "permessage-deflate; server_max_window_bits=",
            'permessage-deflate; server_max_window_bits="10',
            "permessage deflate",
            "permessage-deflate client_max_window_bits",
            "permessage-deflate; a b",
            "permessage-deflate; server_max_window_bits=1 0",
            "(permessage-deflate)",
        ],
    )
    def test_raises(self, value):
        with pytest.raises(NegotiationError, match="invalid Sec-WebSocket-Extensions"):
            negotiate([value], DEFAULT)

    def test_error_names_the_position(self):
        with pytest.raises(NegotiationError) as info:
            negotiate(["permessage-deflate; a b"], DEFAULT)
        assert str(info.value) == (
            "invalid Sec-WebSocket-Extensions 'permessage-deflate; a b': "
            "expected ',' or ';' at position 22"
        )


class TestParse:
    def test_lists_and_fields(self):
        assert parse_extensions(
            ['a; x=1; y, b', ' , c;z="q\\"uoted"', "permessage-deflate"]
        ) == [
            ("a", [("x", "1"), ("y", None)]),
            ("b", []),
            ("c", [("z", 'q"uoted')]),
            ("permessage-deflate", []),
        ]


class TestOptions:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"server_max_window_bits": 8},
            {"server_max_window_bits": 16},
            {"client_max_window_bits": 7},
            {"client_max_window_bits": 16},
            {"level": 10},
            {"mem_level": 0},
            {"threshold_bytes": -1},
        ],
    )
    def test_invalid(self, kwargs):
        with pytest.raises(ValueError):
            DeflateOptions(**kwargs)

    def test_client_window_8_is_allowed(self):
        # We only inflate with it (the Inflater runs 8 as 9).
        options = DeflateOptions(client_max_window_bits=8)
        assert answer(f"{PMD}; client_max_window_bits", options) == f"{PMD}; client_max_window_bits=8"

    def test_frozen(self):
        with pytest.raises(AttributeError):
            DEFAULT.level = 1  # type: ignore[misc]


# --- interop with python-websockets' client side (sans I/O) --------------------------------

websockets_pmd = pytest.importorskip("websockets.extensions.permessage_deflate")
websockets_headers = pytest.importorskip("websockets.headers")
websockets_frames = pytest.importorskip("websockets.frames")


@pytest.mark.parametrize(
    "client_kwargs",
    [
        {},
        {"client_max_window_bits": None},
        {"client_max_window_bits": 10},
        {"server_max_window_bits": 10},
        {"server_max_window_bits": 9},
        {"server_no_context_takeover": True},
        {"client_no_context_takeover": True},
        {"server_no_context_takeover": True, "client_no_context_takeover": True,
         "server_max_window_bits": 11, "client_max_window_bits": 12},
    ],
    ids=repr,
)
@pytest.mark.parametrize("options", [DEFAULT, SHARED], ids=["default", "shared"])
@pytest.mark.parametrize("impl", [ext_deflate, pure_deflate], ids=["ext", "pure"])
def test_websockets_client_accepts_our_answer(client_kwargs, options, impl):
    """websockets' client takes our answer, then both directions inflate."""
    factory = websockets_pmd.ClientPerMessageDeflateFactory(**client_kwargs)
    offer = websockets_headers.build_extension([(factory.name, factory.get_request_params())])
    params, response = negotiate([offer], options)
    [(name, response_params)] = websockets_headers.parse_extension(response)
    client = factory.process_response_params(response_params, [])  # raises if we broke §7.1

    # The client's view of the agreement is ours, mirrored.
    assert client.remote_no_context_takeover == params.server_no_context_takeover
    assert client.local_no_context_takeover == params.client_no_context_takeover
    assert client.remote_max_window_bits == params.server_max_window_bits
    assert client.local_max_window_bits <= params.client_max_window_bits

    deflater = impl.Deflater(**params.deflater_kwargs(options))
    inflater = impl.Inflater(**params.inflater_kwargs(), max_message_bytes=1 << 20)
    Frame, Opcode = websockets_frames.Frame, websockets_frames.Opcode
    for i in range(3):
        message = (b"wirehub %d " % i) * 500
        # server -> client
        frame = Frame(Opcode.BINARY, deflater.compress(message), rsv1=True)
        assert client.decode(frame).data == message
        # client -> server, fragmented in two frames
        first = client.encode(Frame(Opcode.BINARY, message[:1000], fin=False))
        rest = client.encode(Frame(Opcode.CONT, message[1000:], fin=True))
        assert first.rsv1
        assert inflater.feed(first.data, False) + inflater.feed(rest.data, True) == message
