"""Serve a conformant WebSocket echo on picows: the Autobahn baseline peer.

picows leaves message-level rules to the application: it checks opcodes,
masking, control-frame sizes and close codes, but not the reserved bits,
the fragmentation sequence or UTF-8. This echo adds exactly those (RFC 6455
§5.2, §5.4, §8.1) and nothing else, so its Autobahn report is picows's own
baseline: what a careful picows application gets without wirehub.

With ``--deflate`` it also negotiates permessage-deflate (RFC 7692) with
wirehub's ``negotiate``/``Deflater``/``Inflater``, which makes the
12.* and 13.* cases run against wirehub's compression code.

Run::

    python tools/autobahn/picows_echo.py --port 9001 [--deflate] [--pure]

It prints ``listening on ws://127.0.0.1:PORT/`` once the socket is bound
(the runner waits for that line) and serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import logging
import signal
import sys

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

# Autobahn 9.* sends messages up to 16 MiB; leave room for them.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ProtocolViolation(Exception):
    """A peer error that ends the connection with ``code``."""

    def __init__(self, code: WSCloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class EchoListener(WSListener):
    """Echo every complete message back with the same type, unfragmented."""

    def __init__(self, deflate=None) -> None:
        # deflate: (Deflater, Inflater) when permessage-deflate was agreed.
        self._deflate = deflate
        self._msg_type: WSMsgType | None = None
        self._compressed = False
        self._parts: list[bytes] = []
        self._size = 0
        self._utf8 = None
        self._closed = False

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self._closed:
            # §5.5.1: after sending a close frame, send no more data frames;
            # §1.4: everything received after the peer's close is ignored.
            return
        try:
            self._on_frame(transport, frame)
        except ProtocolViolation as exc:
            self._fail(transport, exc.code, str(exc))

    def _fail(self, transport: WSTransport, code: WSCloseCode, reason: str) -> None:
        # RFC 6455 §7.1.7: send a close frame, then drop the connection.
        self._closed = True
        transport.send_close(code, reason.encode()[:120])
        transport.disconnect()

    def _on_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            # §5.5.1: echo the close. picows validated the reason's UTF-8 and
            # most codes, but lets 0 and 1006 through (§7.4.1: 1005/1006/1015
            # "MUST NOT be set"), so check the code here.
            payload = frame.get_payload_as_bytes()
            if len(payload) >= 2 and not _valid_close_code(int.from_bytes(payload[:2], "big")):
                raise ProtocolViolation(WSCloseCode.PROTOCOL_ERROR, "invalid close code")
            self._closed = True
            # Send the payload back raw: send_close() would turn "no code"
            # into a literal code 0.
            transport.send(WSMsgType.CLOSE, payload)
            transport.disconnect()
            return
        if msg_type == WSMsgType.PONG:
            return
        if msg_type == WSMsgType.PING:
            # Answered here rather than by picows's auto-pong, which would
            # also answer pings that arrive after our close frame.
            transport.send(WSMsgType.PONG, frame.get_payload_as_bytes())
            return

        # §5.2: RSV bits must be 0 unless an extension defines them. RFC 7692
        # §6 gives RSV1 to permessage-deflate, on the first frame only.
        if frame.rsv2 or frame.rsv3:
            raise ProtocolViolation(WSCloseCode.PROTOCOL_ERROR, "reserved bit set")
        if frame.rsv1 and (self._deflate is None or msg_type == WSMsgType.CONTINUATION):
            raise ProtocolViolation(WSCloseCode.PROTOCOL_ERROR, "RSV1 set")

        # §5.4: fragmentation.
        if msg_type == WSMsgType.CONTINUATION:
            if self._msg_type is None:
                raise ProtocolViolation(WSCloseCode.PROTOCOL_ERROR, "unexpected continuation")
        else:
            if self._msg_type is not None:
                raise ProtocolViolation(WSCloseCode.PROTOCOL_ERROR, "expected continuation")
            self._msg_type = msg_type
            self._compressed = bool(frame.rsv1)
            self._parts = []
            self._size = 0
            self._utf8 = (
                codecs.getincrementaldecoder("utf-8")() if msg_type == WSMsgType.TEXT else None
            )

        payload = frame.get_payload_as_bytes()
        if self._compressed:
            from_deflate = self._deflate[1]
            try:
                payload = from_deflate.feed(payload, frame.fin)
            except Exception as exc:  # MessageTooBig / InvalidData
                if type(exc).__name__ == "MessageTooBig":
                    raise ProtocolViolation(WSCloseCode.MESSAGE_TOO_BIG, str(exc)) from None
                raise ProtocolViolation(WSCloseCode.PROTOCOL_ERROR, "invalid deflate data") from None
        self._size += len(payload)
        if self._size > MAX_MESSAGE_BYTES:
            raise ProtocolViolation(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
        if self._utf8 is not None:
            # §8.1: fail fast on the first invalid sequence, even mid-message.
            try:
                self._utf8.decode(payload, frame.fin)
            except UnicodeDecodeError:
                raise ProtocolViolation(WSCloseCode.INVALID_TEXT, "invalid UTF-8") from None
        self._parts.append(payload)
        if not frame.fin:
            return

        message = b"".join(self._parts)
        msg_type = self._msg_type
        self._msg_type = None
        self._parts = []
        if self._deflate is not None:
            transport.send(msg_type, self._deflate[0].compress(message), rsv1=True)
        else:
            transport.send(msg_type, message)


def _valid_close_code(code: int) -> bool:
    # RFC 6455 §7.4.1/§7.4.2 and the IANA registry (1012-1014 added since).
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _make_factory(deflate: bool, pure: bool):
    if not deflate:
        return lambda request: EchoListener()

    if pure:
        from wirehub._pure import deflate as impl
    else:
        from wirehub._ext import deflate as impl
    from wirehub.protocol.permessage_deflate import DeflateOptions, negotiate

    options = DeflateOptions()

    def factory(request: WSUpgradeRequest):
        offers = request.headers.getall("Sec-WebSocket-Extensions", [])
        agreed = negotiate(list(offers), options)
        if agreed is None:
            return EchoListener()
        params, header = agreed
        deflater = impl.Deflater(
            level=options.level,
            mem_level=options.mem_level,
            window_bits=params.server_max_window_bits,
            no_context_takeover=params.server_no_context_takeover,
        )
        inflater = impl.Inflater(
            window_bits=params.client_max_window_bits,
            no_context_takeover=params.client_no_context_takeover,
            max_message_bytes=MAX_MESSAGE_BYTES,
        )
        response = WSUpgradeResponse.create_101_response(
            extra_headers={"Sec-WebSocket-Extensions": header}
        )
        return WSUpgradeResponseWithListener(response, EchoListener((deflater, inflater)))

    return factory


async def _serve(host: str, port: int, deflate: bool, pure: bool) -> None:
    server = await ws_create_server(
        _make_factory(deflate, pure),
        host,
        port,
        enable_auto_pong=False,
        max_frame_size=MAX_MESSAGE_BYTES,
        websocket_handshake_timeout=10,
    )
    sock_port = server.sockets[0].getsockname()[1]
    print(f"listening on ws://{host}:{sock_port}/", flush=True)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    await stop
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument(
        "--deflate", action="store_true", help="negotiate permessage-deflate (wirehub code)"
    )
    parser.add_argument(
        "--pure", action="store_true", help="with --deflate: use wirehub._pure.deflate"
    )
    args = parser.parse_args(argv)
    # picows logs every protocol error the fuzzer provokes; keep the console quiet.
    logging.basicConfig(level=logging.CRITICAL)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a wirehub dependency
        runner = asyncio.run
    runner(_serve(args.host, args.port, args.deflate, args.pure))
    return 0


if __name__ == "__main__":
    sys.exit(main())
