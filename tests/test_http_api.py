"""The HTTP publish API (http_api.py) on real sockets: ``http.client`` on one
keep-alive connection for well-formed requests, raw sockets for malformed
ones, WebSocket subscribers to see what was delivered."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import subprocess
import sys
import time
from typing import Any

import pytest
from helpers import free_port, json_client, metrics_text, running_gateway, until

from wirehub import Config, Gateway
from wirehub.auth import mint_token
from wirehub.clock import ManualClock
from wirehub.config import ChannelOptions

SECRET = "s3cret-for-tests-only-32-bytes!!"
KEY = "producer-key-1"


class Api:
    """One ``http.client`` connection to the API, used from a thread (the gateway runs on this loop)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    async def call(self, method: str, path: str, body: Any = None, **headers: str) -> tuple[int, dict, Any]:
        headers = {k.replace("_", "-"): v for k, v in headers.items()}
        payload = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()

        def go() -> tuple[int, dict, Any]:
            self.conn.request(method, path, payload, headers)
            response = self.conn.getresponse()
            return response.status, dict(response.getheaders()), json.loads(response.read())

        return await asyncio.to_thread(go)

    async def publish(self, body: Any, **headers: str) -> tuple[int, dict, Any]:
        return await self.call("POST", "/api/publish", body, **headers)

    def close(self) -> None:
        self.conn.close()


async def raw(port: int, data: bytes, *, then_close: bool = False) -> bytes:
    """Send ``data`` on a fresh socket; everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if then_close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def statuses(answer: bytes) -> list[int]:
    """The status of every answer in ``answer`` (answers to pipelined requests follow each other)."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def body_of(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_a_publish_reaches_subscribers_with_the_answered_offset_on_one_connection():
    async with running_gateway(api_port=0) as gw:
        api = Api(gw.http_api.port)
        async with json_client(gw) as alice, json_client(gw) as bob:
            await alice.subscribe("prices.btc")
            status, headers, answer = await api.publish({"channel": "prices.btc", "data": {"bid": 101.5}})
            assert status == 200, answer
            assert headers["Content-Type"] == "application/json"
            assert answer == {"channel": "prices.btc", "offset": 1, "epoch": answer["epoch"], "delivered": 1}
            assert await alice.recv() == {"type": "message", "channel": "prices.btc", "offset": 1,
                                           "data": {"bid": 101.5}}
            await bob.subscribe("prices.btc")
            _, _, answer = await api.publish({"channel": "prices.btc", "data": [1, "two"], "key": "k"})
            assert (answer["offset"], answer["delivered"]) == (2, 2)
            for client in (alice, bob):
                assert (await client.recv())["data"] == [1, "two"]
            _, _, answer = await api.publish({"channel": "nobody.listens", "data": None})
            assert (answer["offset"], answer["delivered"]) == (1, 0)
        assert gw.http_api.connections_total == 1   # three requests, one keep-alive connection
        api.close()


async def test_an_idempotency_key_retry_is_answered_duplicate_and_not_published_again():
    async with running_gateway(api_port=0) as gw:
        api = Api(gw.http_api.port)
        async with json_client(gw) as sub:
            await sub.subscribe("orders")
            body = {"channel": "orders", "data": {"id": 7}, "idempotency_key": "order-7"}
            _, _, first = await api.publish(body)
            _, _, retry = await api.publish(body)
            assert "duplicate" not in first and first["delivered"] == 1
            assert retry == {**first, "delivered": 0, "duplicate": True}
            await api.publish({"channel": "orders", "data": "next"})
            assert [(await sub.recv())["data"] for _ in range(2)] == [{"id": 7}, "next"]
        assert "wirehub_duplicate_publishes_total 1" in await metrics_text(gw.port)
        api.close()


async def test_broadcast_and_batch_answer_each_item_in_order():
    async with running_gateway(api_port=0) as gw:
        api = Api(gw.http_api.port)
        async with json_client(gw) as a, json_client(gw) as b:
            await a.subscribe("room.a")
            await b.subscribe("room.b")
            status, _, answer = await api.call("POST", "/api/broadcast",
                                               {"channels": ["room.a", "room.b", "$sys:metrics", "bad name"],
                                                "data": {"hello": 1}})
            assert status == 200
            ok, ok2, reserved, bad = answer["results"]
            assert (ok["channel"], ok["offset"], ok["delivered"]) == ("room.a", 1, 1)
            assert (ok2["channel"], ok2["offset"], ok2["delivered"]) == ("room.b", 1, 1)
            assert reserved["error"]["code"] == "forbidden"
            assert bad["error"]["code"] == "invalid_channel"
            assert (await a.recv())["data"] == (await b.recv())["data"] == {"hello": 1}

            status, _, answer = await api.call("POST", "/api/batch", {"publishes": [
                {"channel": "room.a", "data": 1}, {"channel": "room.*", "data": 2},
                {"channel": "room.a", "data": 3, "idempotency_key": "x"},
                {"channel": "room.a", "data": 3, "idempotency_key": "x"}]})
            assert status == 200
            first, pattern, third, retry = answer["results"]
            assert [first["offset"], third["offset"], retry["offset"]] == [2, 3, 3]
            assert retry["duplicate"] is True and "duplicate" not in third
            assert pattern == {"channel": "room.*", "error": {"code": "invalid_channel",
                                                                "error": pattern["error"]["error"]}}
            assert [(await a.recv())["data"] for _ in range(2)] == [1, 3]

            status, _, answer = await api.call("GET", "/api/channels?pattern=room.*")
            assert answer == {"channels": [{"channel": "room.a", "subscribers": 1},
                                           {"channel": "room.b", "subscribers": 1}]}
        api.close()


async def test_history_reads_what_a_channel_keeps():
    async with running_gateway(api_port=0, channels=[ChannelOptions(pattern="log.*", history_size=10)]) as gw:
        api = Api(gw.http_api.port)
        for i in range(3):
            _, _, answer = await api.publish({"channel": "log.a", "data": {"n": i}})
        epoch = answer["epoch"]
        status, _, page = await api.call("GET", f"/api/history?channel=log.a&since=1&epoch={epoch}&limit=1")
        assert status == 200
        assert page == {"channel": "log.a", "position": {"offset": 3, "epoch": epoch},
                        "publications": [{"offset": 2, "data": {"n": 1}}], "more": True}
        status, _, error = await api.call("GET", "/api/history?channel=log.a&since=1")
        assert (status, error["code"]) == (400, "invalid_field")
        api.close()


async def test_bad_json_and_bad_fields_are_400_with_the_protocols_codes():
    async with running_gateway(api_port=0) as gw:
        api = Api(gw.http_api.port)
        cases = [(b"{not json", "invalid_message"), (b"", "invalid_message"),
                 (b'{"channel": "a"}', "invalid_field"), (b'{"channel": 5, "data": 1}', "invalid_field"),
                 (b'{"channel": "a", "data": 1, "extra": 1}', "invalid_field"),
                 (b'{"channel": "a", "data": 1, "key": "' + b"k" * 256 + b'"}', "invalid_field"),
                 (b'{"channel": "", "data": 1}', "invalid_channel"),
                 (b'{"channel": "$sys:metrics", "data": 1}', "forbidden")]
        for body, code in cases:
            status, _, answer = await api.publish(body)
            assert (status, answer["code"]) == ({"forbidden": 403}.get(code, 400), code), body
        status, _, answer = await api.call("POST", "/api/nothing", b"{}")
        assert (status, answer["code"]) == (404, "not_found")
        status, headers, answer = await api.call("GET", "/api/publish")
        assert (status, answer["code"], headers["Allow"]) == (405, "method_not_allowed", "POST")
        assert gw.http_api.connections_total == 1   # errors keep the connection
        text = await metrics_text(gw.port)
        assert 'wirehub_api_errors_total{code="invalid_field"} 4' in text
        assert 'wirehub_api_requests_total{endpoint="/api/publish",status="400"} 7' in text
        assert 'wirehub_api_requests_total{endpoint="/api/publish",status="403"} 1' in text
        api.close()


async def test_api_keys_and_tokens():
    async with running_gateway(api_port=0, api_key=[KEY, "second-key"], jwt_secret=SECRET, api_jwt=True) as gw:
        api = Api(gw.http_api.port)
        body = {"channel": "telemetry.cpu", "data": 1}
        status, headers, answer = await api.publish(body)
        assert (status, answer["code"]) == (401, "not_authenticated")
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, headers, answer = await api.publish(body, X_API_Key="wrong")
        assert (status, answer["code"]) == (401, "invalid_token")
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert (await api.publish(body, X_API_Key=KEY))[0] == 200
        assert (await api.publish(body, Authorization="Bearer second-key"))[0] == 200

        token = mint_token(SECRET, sub="sensor-1", publish=["telemetry.*"])
        assert (await api.publish(body, Authorization=f"Bearer {token}"))[0] == 200
        status, _, answer = await api.publish({"channel": "billing.x", "data": 1}, Authorization=f"Bearer {token}")
        assert (status, answer["code"]) == (403, "forbidden")
        status, _, answer = await api.call("POST", "/api/batch", {"publishes": [
            {"channel": "telemetry.mem", "data": 1}, {"channel": "billing.x", "data": 1}]},
            Authorization=f"Bearer {token}")
        assert status == 200 and [r.get("error", {}).get("code") for r in answer["results"]] == [None, "forbidden"]
        expired = mint_token(SECRET, sub="sensor-1", publish=["**"], ttl_s=60, now=time.time() - 3600)
        status, _, answer = await api.publish(body, Authorization=f"Bearer {expired}")
        assert (status, answer["code"]) == (401, "token_expired")
        status, _, answer = await api.publish(body, Authorization="Basic abc")
        assert (status, answer["code"]) == (401, "invalid_token")
        text = await metrics_text(gw.port)
        assert 'wirehub_api_errors_total{code="invalid_token"} 2' in text
        assert 'wirehub_api_requests_total{endpoint="/api/publish",status="401"} 4' in text
        api.close()


async def test_without_api_keys_or_api_jwt_a_keyed_gateways_api_is_off():
    async with running_gateway(api_port=0, jwt_secret=SECRET) as gw:
        assert gw.http_api.mode == "off" and "OFF" in gw.http_api.describe()
        api = Api(gw.http_api.port)
        token = mint_token(SECRET, sub="x", publish=["**"])
        status, _, answer = await api.publish({"channel": "a", "data": 1}, Authorization=f"Bearer {token}")
        assert (status, answer["code"]) == (404, "not_found")
        assert "--api-key" in answer["error"] and "--api-jwt" in answer["error"]
        api.close()
    async with running_gateway(api_port=0, jwt_secret=SECRET, api_jwt=True) as gw:
        assert gw.http_api.mode == "jwt"
        token = mint_token(SECRET, sub="x", publish=["**"])
        api = Api(gw.http_api.port)
        status, _, answer = await api.publish({"channel": "a", "data": 1}, X_API_Key=token)
        assert (status, answer["code"]) == (401, "invalid_token")   # X-API-Key takes API keys only
        assert (await api.publish({"channel": "a", "data": 1}, Authorization=f"Bearer {token}"))[0] == 200
        api.close()
    async with running_gateway(api_port=0, api_key=[KEY]) as gw:
        status, _, answer = await Api(gw.http_api.port).publish({"channel": "a", "data": 1})
        assert (status, answer["code"]) == (401, "not_authenticated")   # keys on an open gateway: required
    async with running_gateway(api_port=0) as gw:
        assert gw.http_api.mode == "open" and "OPEN" in gw.http_api.describe()


def test_api_jwt_needs_a_key():
    with pytest.raises(ValueError, match="api_jwt needs a key"):
        Config(api_jwt=True)


async def test_the_websocket_port_points_api_paths_to_the_api_port():
    # (picows refuses any method but GET before the gateway sees the path: a
    # POST there is answered 400 "Unsupported HTTP method".)
    async with running_gateway() as gw:
        answer = await raw(gw.port, b"GET /api/publish HTTP/1.1\r\nHost: x\r\n\r\n", then_close=True)
        assert statuses(answer) == [404] and "--api-port" in body_of(answer)["error"]
    async with running_gateway(api_port=0) as gw:
        answer = await raw(gw.port, b"GET /api/publish HTTP/1.1\r\nHost: x\r\n\r\n", then_close=True)
        assert f":{gw.http_api.port} (--api-port)" in body_of(answer)["error"]


async def test_a_body_over_max_payload_bytes_is_413():
    async with running_gateway(api_port=0, max_payload_bytes=1024, high_water_bytes=4096) as gw:
        port = gw.http_api.port
        fits = json.dumps({"channel": "a", "data": "x" * 900}).encode()
        assert statuses(await raw(port, post("/api/publish", fits, "Connection: close"))) == [200]
        big = json.dumps({"channel": "a", "data": "x" * 1100}).encode()
        # Refused on its Content-Length, before the body is read; the connection closes.
        answer = await raw(port, post("/api/publish", big)[:-len(big)])
        assert statuses(answer) == [413] and body_of(answer)["code"] == "payload_too_large"
        # Chunked: refused once the chunks pass the limit.
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 500]), big[i:i + 500]) for i in range(0, len(big), 500))
        answer = await raw(port, b"POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + chunks + b"0\r\n\r\n")
        assert statuses(answer) == [413]
        # Expect: 100-continue (curl, for bodies over 1 KiB) gets its 413 instead of the 100.
        answer = await raw(port, post("/api/publish", big, "Expect: 100-continue")[:-len(big)])
        assert statuses(answer) == [413]
        assert gw.metrics.publications_total == 1
        text = await metrics_text(gw.port)
        assert 'wirehub_api_requests_total{endpoint="/api/publish",status="413"} 3' in text
        assert 'wirehub_api_errors_total{code="payload_too_large"} 3' in text


async def test_expect_100_continue_is_answered():
    async with running_gateway(api_port=0) as gw:
        body = json.dumps({"channel": "a", "data": 1}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_api.port)
        writer.write(post("/api/publish", body, "Expect: 100-continue")[:-len(body)])
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.close()


async def test_a_per_key_rate_limit_answers_429_and_refills_on_the_gateway_clock():
    clock = ManualClock()
    gateway = Gateway(Config(port=0, api_port=0, api_key=[KEY, "other"], api_rate_limit_per_s=1,
                             api_rate_limit_burst=3), clock=clock)
    async with running_gateway(gateway=gateway) as gw:
        api = Api(gw.http_api.port)
        body = {"channel": "a", "data": 1}
        assert [(await api.publish(body, X_API_Key=KEY))[0] for _ in range(3)] == [200, 200, 200]
        status, headers, answer = await api.publish(body, X_API_Key=KEY)
        assert (status, answer["code"], headers["Retry-After"]) == (429, "rate_limited", "1")
        assert (await api.publish(body, X_API_Key="other"))[0] == 200   # its own bucket
        status, _, answer = await api.call("POST", "/api/broadcast", {"channels": list("abcd"), "data": 1},
                                           X_API_Key="other")
        assert status == 429 and "split it" in answer["error"]   # 4 publications, burst 3
        clock.advance(1.0)
        assert (await api.publish(body, X_API_Key=KEY))[0] == 200
        assert gw.metrics.publications_total == 5   # a refused request publishes nothing
        text = await metrics_text(gw.port)
        assert 'wirehub_api_errors_total{code="rate_limited"} 2' in text
        assert 'wirehub_api_requests_total{endpoint="/api/publish",status="429"} 1' in text
        api.close()


async def test_pipelined_requests_are_answered_in_order():
    async with running_gateway(api_port=0) as gw:
        requests = b"".join(post("/api/publish", json.dumps({"channel": "p", "data": i}).encode())
                            for i in range(5))
        answer = await raw(gw.http_api.port, requests + b"GET /api/channels HTTP/1.1\r\nHost: x\r\n"
                           b"Connection: close\r\n\r\n")
        assert statuses(answer) == [200] * 6
        offsets = [json.loads(part.partition(b"\r\n\r\n")[2].split(b"HTTP/1.1")[0])["offset"]
                   for part in answer.split(b"HTTP/1.1 200 OK\r\n")[1:6]]
        assert offsets == [1, 2, 3, 4, 5]


MALFORMED = {
    "bad request line": b"GARBAGE\r\n\r\n",
    "no HTTP version": b"POST /api/publish\r\nHost: x\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "bad Content-Length": b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n{}",
    "negative Content-Length": b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
    "conflicting Content-Lengths": b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                   b"Content-Length: 3\r\n\r\n{}",
    "missing Host": b"POST /api/publish HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    "space before colon": b"POST /api/publish HTTP/1.1\r\nHost : x\r\nContent-Length: 2\r\n\r\n{}",
    "bare LF in a header": b"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-A: b\nc\r\n\r\n",
    "bad chunk size": b"POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "unknown transfer coding": b"POST /api/publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_malformed_requests_are_refused_and_the_connection_closed(case):
    async with running_gateway(api_port=0) as gw:
        answer = await raw(gw.http_api.port, MALFORMED[case])
        assert statuses(answer) in ([400], [501], [505]), answer
        assert body_of(answer)["code"] in ("bad_request", "not_implemented")
        assert gw.metrics.publications_total == 0
        # The gateway goes on serving.
        ok = await raw(gw.http_api.port, post("/api/publish", b'{"channel":"a","data":1}', "Connection: close"))
        assert statuses(ok) == [200]


async def test_content_length_with_chunked_is_refused_and_smuggles_nothing():
    async with running_gateway(api_port=0) as gw:
        smuggled = post("/api/publish", b'{"channel":"smuggled","data":1}')
        chunked = b"0\r\n\r\n"
        answer = await raw(gw.http_api.port, b"POST /api/publish HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chunked + smuggled)
                           + chunked + smuggled)
        assert statuses(answer) == [400] and "Transfer-Encoding" in body_of(answer)["error"]
        assert gw.metrics.publications_total == 0


async def test_a_request_head_over_max_header_bytes_is_431():
    async with running_gateway(api_port=0, max_header_bytes=2048) as gw:
        port = gw.http_api.port
        # Arriving whole (h11 parses it) and arriving in pieces (h11's own limit).
        head = post("/api/publish", b'{"channel":"a","data":1}', "X-Big: " + "b" * 3000)
        assert statuses(await raw(port, head)) == [431]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /api/publish HTTP/1.1\r\nHost: x\r\n")
        for _ in range(40):
            writer.write(b"X-Pad: " + b"p" * 100 + b"\r\n")
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert statuses(answer) == [431] and body_of(answer)["code"] == "header_too_large"


async def test_a_slow_request_is_cut_at_the_request_timeout_and_an_idle_one_at_the_idle_timeout():
    clock = ManualClock()
    gateway = Gateway(Config(port=0, api_port=0, api_request_timeout_s=10, api_idle_timeout_s=60), clock=clock)
    async with running_gateway(gateway=gateway) as gw:
        api = gw.http_api
        reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
        writer.write(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-Slow")   # a slowloris head
        # (what the test waits for: the gateway has read the partial head)
        await until(lambda: any(conn._in_request for conn in api.connections), what="the head's first bytes")
        clock.advance(9.9)   # (the clock runs the timers due within advance(): no wait to check)
        assert api.timeouts_total["request"] == 0
        clock.advance(0.2)
        answer = await asyncio.wait_for(reader.read(), 10)
        assert statuses(answer) == [408] and body_of(answer)["code"] == "request_timeout"
        writer.close()

        idle = Api(api.port)
        assert (await idle.publish({"channel": "a", "data": 1}))[0] == 200
        await until(lambda: len(api.connections) == 1, what="the first connection gone")
        clock.advance(59)
        assert len(api.connections) == 1
        clock.advance(2)
        await until(lambda: not api.connections, what="the idle connection closed")
        assert (api.timeouts_total["request"], api.timeouts_total["idle"]) == (1, 1)
        idle.close()
        again = Api(api.port)
        assert (await again.publish({"channel": "a", "data": 2}))[0] == 200
        again.close()
        text = await metrics_text(gw.port)
        assert 'wirehub_api_timeouts_total{phase="request"} 1' in text


async def test_a_client_gone_mid_request_takes_nothing_down():
    async with running_gateway(api_port=0) as gw:
        _, writer = await asyncio.open_connection("127.0.0.1", gw.http_api.port)
        writer.write(post("/api/publish", b'{"channel":"a","data":1}')[:-5])
        writer.close()
        await until(lambda: not gw.http_api.connections, what="the connection dropped")
        ok = await raw(gw.http_api.port, post("/api/publish", b'{"channel":"a","data":1}', "Connection: close"))
        assert statuses(ok) == [200]


def test_serve_says_how_the_api_authenticates():
    port, api_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wirehub", "serve", "--port", str(port), "--api-port",
                             str(api_port), "--jwt-secret", SECRET], stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline() for _ in range(2)]
        assert "listening on" in lines[0]
        assert f"HTTP API OFF on http://127.0.0.1:{api_port}/api/" in lines[1], lines
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
