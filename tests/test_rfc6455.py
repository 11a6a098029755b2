"""RFC 6455 behaviour of the receive path, with hand-made frames on a raw socket.

These are the cases a WebSocket library will not produce on purpose
(reserved opcodes, unmasked frames, two CLOSEs), sent in one TCP write so
that picows sees them in one read: the read-ahead guard must still deliver
frame N, and its reply, before anything reacts to frame N+1.
"""

from __future__ import annotations

import asyncio

import pytest

from helpers import RawClient, client_frame, close_frame, running_gateway


@pytest.fixture(params=["ext", "pure"])
def impl_name(request):
    return request.param


async def echo_client(gw):
    client = await RawClient.connect(gw.port)
    assert client.handshake.startswith("HTTP/1.1 101"), client.handshake
    return client


class TestReadAhead:
    @pytest.mark.parametrize("bad_frame", [
        client_frame(0x3, b"reserved"),                 # reserved non-control opcode
        client_frame(0xB),                              # reserved control opcode
        client_frame(0x1, b"x", masked=False),          # unmasked client frame
        client_frame(0x9, b"p", fin=False),             # fragmented control frame
        close_frame(999),                               # forbidden close code
    ])
    async def test_message_before_a_bad_frame_is_answered_first(self, impl_name, bad_frame):
        async with running_gateway(impl_name, echo=True) as gw:
            c = await echo_client(gw)
            c.writer.write(client_frame(0x1, b"first") + bad_frame + client_frame(0x9, b"late"))
            assert await c.frame() == (0x1, b"first")
            assert await c.close_code() == 1002

    async def test_parser_rejections_are_counted_not_logged_as_errors(self, impl_name, caplog):
        async with running_gateway(impl_name, echo=True) as gw:
            c = await echo_client(gw)
            c.writer.write(client_frame(0x3))
            assert await c.close_code() == 1002
            assert gw.metrics.closes_total[1002] == 1
        assert not [r for r in caplog.records if r.levelname == "ERROR"]

    async def test_second_close_is_ignored(self, impl_name):
        async with running_gateway(impl_name, echo=True) as gw:
            c = await echo_client(gw)
            c.writer.write(client_frame(0x1, b"hi") + close_frame(1000) + close_frame(1001))
            assert await c.frame() == (0x1, b"hi")
            assert await c.close_code() == 1000
            assert await asyncio.wait_for(c.reader.read(), 3) == b""  # server closed TCP

    async def test_frames_split_byte_by_byte(self, impl_name):
        async with running_gateway(impl_name, echo=True) as gw:
            c = await echo_client(gw)
            data = client_frame(0x1, b"a" * 200) + client_frame(0x2, b"b" * 70000) + client_frame(0x3)
            for i in range(0, 300):
                c.writer.write(data[i:i + 1])
                await c.writer.drain()
            c.writer.write(data[300:])
            assert await c.frame() == (0x1, b"a" * 200)
            assert await c.frame() == (0x2, b"b" * 70000)
            assert await c.close_code() == 1002


class TestFraming:
    async def test_fragments_with_interleaved_ping(self, impl_name):
        async with running_gateway(impl_name, echo=True) as gw:
            c = await echo_client(gw)
            c.writer.write(client_frame(0x1, b"frag", fin=False) + client_frame(0x9, b"ping!")
                           + client_frame(0x0, b"ment", fin=False) + client_frame(0x0, b"ed"))
            assert await c.frame() == (0xA, b"ping!")
            assert await c.frame() == (0x1, b"fragmented")

    @pytest.mark.parametrize("frames, code", [
        ([client_frame(0x0, b"orphan")], 1002),                                   # nothing to continue
        ([client_frame(0x1, b"a", fin=False), client_frame(0x1, b"b")], 1002),   # new message mid-way
        ([client_frame(0x1, b"x", rsv=4)], 1002),                                # RSV1 without deflate
        ([client_frame(0x8, b"\x03\xe8", rsv=7)], 1002),                         # CLOSE with RSV bits (3.7)
        ([client_frame(0xA, b"", rsv=2)], 1002),                                 # PONG with RSV2
        ([client_frame(0x1, "☃".encode()[:2], fin=False), client_frame(0x0, b"x")], 1007),
        ([client_frame(0x1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80")], 1007),
    ])
    async def test_violations_close_with_the_right_code(self, impl_name, frames, code):
        async with running_gateway(impl_name, echo=True) as gw:
            c = await echo_client(gw)
            c.writer.write(b"".join(frames))
            assert await c.close_code() == code

    async def test_invalid_utf8_fails_fast_before_the_message_ends(self, impl_name):
        async with running_gateway(impl_name, echo=True) as gw:
            c = await echo_client(gw)
            c.writer.write(client_frame(0x1, b"ok \xf4\x90\x80\x80", fin=False))  # > U+10FFFF
            assert await c.close_code() == 1007

    async def test_close_with_reason_is_echoed(self, impl_name):
        async with running_gateway(impl_name, echo=True) as gw:
            c = await echo_client(gw)
            c.writer.write(close_frame(3000, b"done"))
            assert await c.close_code() == 3000

    @pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 2000, 2999, 5000])
    async def test_forbidden_close_codes_are_answered_1002(self, impl_name, code):
        async with running_gateway(impl_name, echo=True) as gw:
            c = await echo_client(gw)
            c.writer.write(close_frame(code))
            assert await c.close_code() == 1002

    async def test_empty_close_is_answered_1000(self, impl_name):
        async with running_gateway(impl_name, echo=True) as gw:
            c = await echo_client(gw)
            c.writer.write(client_frame(0x8))
            assert await c.close_code() == 1000

    async def test_too_many_fragments(self, impl_name):
        async with running_gateway(impl_name, echo=True, max_fragments=4) as gw:
            c = await echo_client(gw)
            c.writer.write(client_frame(0x2, b"1", fin=False) + b"".join(
                client_frame(0x0, b"n", fin=False) for _ in range(4)))
            assert await c.close_code() == 1008
