"""Authentication, authorization and abuse limits, with real clients on loopback.

Every refusal is checked from the client's side (HTTP status before the
upgrade, ``error``/``auth_error`` and close codes after it) and in
``/metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import resource
import shutil
import ssl
import subprocess
import sys
import time
from typing import Any

import jwt
import pytest
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from wirehub import Config
from wirehub.admission import Admission
from wirehub.auth import mint_token
from wirehub.metrics import Metrics

from helpers import JsonClient, RawClient, json_client, metrics_text, running_gateway, start_server, until

SECRET = "integration-secret-long-enough-for-hs256!"


def token(**kwargs: Any) -> str:
    kwargs.setdefault("sub", "alice")
    return mint_token(SECRET, **kwargs)


async def http_get(port: int, path: str = "/ws", headers: dict[str, str] | None = None,
                   head: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send an upgrade request; return the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if head is None:
            key = base64.b64encode(os.urandom(16)).decode()
            lines = [f"GET {path} HTTP/1.1", "Host: localhost", "Upgrade: websocket", "Connection: Upgrade",
                     f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        writer.write(head)
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status_line, *header_lines = raw.decode("latin-1").split("\r\n")
        answer = dict(line.split(": ", 1) for line in header_lines if ": " in line)
        body = b""
        if "Content-Length" in answer:
            body = await asyncio.wait_for(reader.readexactly(int(answer["Content-Length"])), 5)
        return int(status_line.split()[1]), answer, body
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def client(gw, *, token_: str | None = None, path: str = "/ws", **kwargs: Any):
    if token_ is not None:
        path = f"{path}?token={token_}"
    async with json_client(gw, path, **kwargs) as c:
        yield c


async def closed_with(c: JsonClient, timeout: float = 5.0) -> tuple[int, str]:
    with pytest.raises(websockets.ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(c.ws.recv(), timeout)
    return info.value.rcvd.code, info.value.rcvd.reason


def secured(**config: Any):
    return running_gateway(jwt_secret=SECRET, jwt_leeway_s=0, **config)


# -- authentication ----------------------------------------------------------------

async def test_without_a_token_only_auth_is_processed():
    """(The authentication timeout that follows: tests/test_clock.py.)"""
    async with secured() as gw:
        t = token(subscribe=["t"], publish=["t"])
        async with client(gw, token_=t) as watcher, client(gw, token_=t) as publisher, client(gw) as anon:
            await watcher.subscribe("t")
            assert await anon.request(type="publish", channel="t", data=1, id=1) == {
                "type": "error", "code": "not_authenticated", "id": 1,
                "error": 'authenticate first: {"type":"auth","token":"<JWT>"}'}
            assert (await anon.request(type="subscribe", channel="t"))["code"] == "not_authenticated"
            # The refused publish was not processed: the first message on "t" is this one.
            assert (await publisher.request(type="publish", channel="t", data="marker", id=2))["type"] == "published"
            first = await watcher.recv()
            assert first["type"] == "message" and first["data"] == "marker"


async def test_auth_message_then_claims_apply():
    async with secured() as gw, client(gw) as c:
        t = token(subscribe=["runner:*"], publish=["telemetry.*"])
        assert await c.request(type="auth", token=t, id="a1") == {
            "type": "authenticated", "sub": "alice", "id": "a1", "exp": jwt.decode(
                t, options={"verify_signature": False})["exp"]}
        await c.subscribe("runner:7")
        assert await c.request(type="subscribe", channel="runner:7:logs", id=2) == {
            "type": "error", "code": "forbidden", "id": 2,
            "error": "not allowed to subscribe to 'runner:7:logs'"}
        assert (await c.request(type="publish", channel="runner:7", data=1, id=3))["code"] == "forbidden"
        assert (await c.request(type="publish", channel="telemetry.x", data=1, id=4))["type"] == "published"
        # Escape attempts: one segment means one segment, separators are literal.
        for channel in ("telemetry.x.y", "telemetry:x", "telemetryx"):
            assert (await c.request(type="publish", channel=channel, data=1))["code"] == "forbidden"
        for channel in ("runner.7", "runner:", "runner:7:8"):
            reply = await c.request(type="subscribe", channel=channel)
            assert reply["code"] in ("forbidden", "invalid_channel"), reply


@pytest.mark.parametrize("bad, code", [
    (lambda: jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, "wrong-secret-wrong-secret-wrong!!"),
     "invalid_token"),
    (lambda: token(ttl_s=-10), "token_expired"),
    (lambda: "not.a.jwt", "invalid_token"),
])
async def test_bad_token_in_auth_message_closes_1008(bad, code):
    async with secured() as gw, client(gw) as c:
        reply = await c.request(type="auth", token=bad())
        assert reply["type"] == "auth_error" and reply["code"] == code
        assert (await closed_with(c))[0] == 1008
        assert f'wirehub_auth_failures_total{{code="{code}"}} 1' in await metrics_text(gw.port)


async def test_bad_token_in_the_upgrade_is_refused_with_401(impl):
    none_token = (base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode() + "."
                  + base64.urlsafe_b64encode(json.dumps({"sub": "a", "exp": 2**40}).encode())
                  .rstrip(b"=").decode() + ".")
    wrong_aud = jwt.encode({"sub": "a", "exp": int(time.time()) + 60, "aud": "other"}, SECRET)
    async with secured(jwt_audience="wirehub") as gw:
        for bad, code in ((none_token, "invalid_token"), (token(ttl_s=-5, aud="wirehub"), "token_expired"),
                          (wrong_aud, "invalid_token")):
            status, headers, body = await http_get(gw.port, f"/ws?token={bad}")
            assert status == 401
            assert headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
            assert json.loads(body)["code"] == code
        status, _, _ = await http_get(gw.port, headers={"Authorization": "Basic YTpi"})
        assert status == 401
        with pytest.raises(websockets.InvalidStatus):
            async with client(gw, token_="garbage"):
                pass
        text = await metrics_text(gw.port)
        assert 'wirehub_refusals_total{reason="unauthorized"} 5' in text


async def test_hs256_signed_with_the_rsa_public_key_is_refused_over_the_wire(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "pub.pem").write_bytes(pem)
    claims = {"sub": "mallory", "exp": int(time.time()) + 60, "subscribe": ["**"]}
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    import hashlib
    import hmac

    sig = base64.urlsafe_b64encode(hmac.new(pem, header + b"." + payload, hashlib.sha256).digest()).rstrip(b"=")
    forged = b".".join([header, payload, sig]).decode()
    async with running_gateway(jwt_public_key=str(tmp_path / "pub.pem")) as gw:
        status, _, body = await http_get(gw.port, f"/ws?token={forged}")
        assert status == 401 and b"HS256" in body
        good = jwt.encode(claims, key, algorithm="RS256")
        async with client(gw, token_=good) as c:
            await c.subscribe("anything")


async def test_token_in_authorization_header_and_subprotocol():
    async with secured() as gw:
        t = token(subscribe=["a"])
        async with json_client(gw, additional_headers={"Authorization": f"Bearer {t}"}) as c:
            await c.subscribe("a")
            assert (await c.request(type="subscribe", channel="b"))["code"] == "forbidden"
        # The browser convention: the token rides in an offered subprotocol;
        # the server accepts "wirehub" and never echoes the token.
        async with json_client(gw, subprotocols=["wirehub", f"bearer.{t}"]) as c:
            assert c.ws.subprotocol == "wirehub"
            await c.subscribe("a")
        status, _, _ = await http_get(gw.port, headers={"Sec-WebSocket-Protocol": f"bearer.{t}"})
        assert status == 401


async def test_refresh_for_another_subject_is_refused():
    async with secured() as gw, client(gw, token_=token(sub="alice")) as c:
        reply = await c.request(type="auth", token=token(sub="mallory", subscribe=["**"]))
        assert reply["code"] == "subject_changed"
        assert (await closed_with(c))[0] == 1008


async def test_anonymous_access_is_explicit():
    async with secured(allow_anonymous=True, default_subscribe=["public.*"]) as gw, client(gw) as c:
        await c.subscribe("public.news")
        assert (await c.request(type="subscribe", channel="private.x"))["code"] == "forbidden"
        assert (await c.request(type="publish", channel="public.news", data=1))["code"] == "forbidden"
        # ... and may still authenticate to get more.
        assert (await c.request(type="auth", token=token(subscribe=["private.*"])))["type"] == "authenticated"
        await c.subscribe("private.x")


async def test_open_gateway_allows_everything_but_permissions():
    async with running_gateway() as gw:
        gw.on("runner_stop", lambda conn, msg: {"type": "stopped"}, permission="runners:delete")
        async with client(gw) as c:
            await c.subscribe("any.thing")
            reply = await c.request(type="auth", token="whatever")
            assert reply["code"] == "auth_not_configured"
            assert (await c.request(type="runner_stop", id=1))["code"] == "forbidden"
            await c.subscribe("still.open")
        assert 'wirehub_auth_failures_total{code="auth_not_configured"} 1' in await metrics_text(gw.port)


def test_serve_warns_when_open_and_not_when_secured():
    for args, open_gateway in (((), True), (("--jwt-secret", SECRET), False)):
        proc = subprocess.Popen([sys.executable, "-m", "wirehub", "serve", "--port", "0", *args],
                                stderr=subprocess.PIPE, text=True)
        try:
            assert "listening on" in proc.stderr.readline()
        finally:
            proc.terminate()
            rest = proc.stderr.read()
            proc.wait(10)
        assert ("WARNING" in rest and "the gateway is OPEN" in rest) is open_gateway, rest


# -- authorization -------------------------------------------------------------------

async def test_publish_outside_claims_delivers_nothing():
    async with secured() as gw:
        async with client(gw, token_=token(subscribe=["**"])) as watcher, \
                client(gw, token_=token(sub="bob", publish=["telemetry.*"])) as bob:
            await watcher.subscribe("runner:1")
            reply = await bob.request(type="publish", channel="runner:1", data={"x": 1}, id=5)
            assert reply == {"type": "error", "code": "forbidden", "id": 5,
                             "error": "not allowed to publish to 'runner:1'"}
            await watcher.expect_silence(0.3)
        assert 'wirehub_errors_total{code="forbidden"} 1' in await metrics_text(gw.port)


async def test_invalid_names_are_refused_before_the_permission_cache_sees_them():
    """Each refused name used to stay in the principal's answer cache (up to
    1,024 names of up to a message's size each); now only valid names reach it."""
    async with secured() as gw, client(gw, token_=token(sub="eve", publish=["telemetry.*"])) as eve:
        long_name = "telemetry." + "x" * 100_000
        for kind in ("publish", "subscribe"):
            reply = await eve.request(type=kind, channel=long_name, data=1, id=1)
            assert reply["code"] == "invalid_channel", reply
        assert (await eve.request(type="publish", channel="system.x", data=1, id=2))["code"] == "forbidden"
        principal = gw.connections[0].principal
        cached = [*principal._can_publish, *principal._can_subscribe]
        assert cached == ["system.x"]


async def test_pattern_subscription_is_authorized_per_channel():
    async with secured() as gw:
        publisher = token(sub="pub", publish=["**"])
        async with client(gw, token_=token(subscribe=["telemetry.a.*", "telemetry.b.cpu"])) as sub, \
                client(gw, token_=publisher) as pub:
            await sub.subscribe("telemetry.*.cpu")
            await sub.subscribe("telemetry.b.cpu")  # direct and by pattern: delivered once
            for channel in ("telemetry.a.cpu", "telemetry.b.cpu", "telemetry.c.cpu", "telemetry.a.mem",
                            "telemetry.a.x.cpu"):
                assert (await pub.request(type="publish", channel=channel, data=channel, id=1))["type"] == "published"
            got = [await sub.recv(), await sub.recv()]
            assert got == [{"type": "message", "channel": "telemetry.a.cpu", "offset": 1, "data": "telemetry.a.cpu"},
                           {"type": "message", "channel": "telemetry.b.cpu", "offset": 1, "data": "telemetry.b.cpu"}]
            await sub.expect_silence(0.3)
            assert await sub.request(type="unsubscribe", channel="telemetry.*.cpu") == {
                "type": "unsubscribed", "channel": "telemetry.*.cpu"}
            await pub.request(type="publish", channel="telemetry.a.cpu", data=2, id=2)
            await sub.expect_silence(0.3)
            assert (await sub.request(type="subscribe", channel="telemetry.**.cpu"))["code"] == "invalid_channel"


async def test_permissioned_handlers():
    async with secured() as gw:
        stopped = []

        @gw.on("runner_stop", permission="runners:delete")
        def runner_stop(conn, msg):
            stopped.append((conn.principal.sub, msg["runner"]))
            return {"type": "runner_stopped", "runner": msg["runner"]}

        async with client(gw, token_=token(sub="viewer")) as viewer, \
                client(gw, token_=token(sub="ops", permissions=["runners:delete"])) as ops, \
                client(gw, token_=token(sub="root", permissions=["admin"])) as root:
            assert await viewer.request(type="runner_stop", runner="r1", id=1) == {
                "type": "error", "code": "forbidden", "id": 1,
                "error": "'runner_stop' needs permission 'runners:delete'"}
            assert (await ops.request(type="runner_stop", runner="r2"))["type"] == "runner_stopped"
            assert (await root.request(type="runner_stop", runner="r3"))["type"] == "runner_stopped"
        assert stopped == [("ops", "r2"), ("root", "r3")]


# -- limits --------------------------------------------------------------------------

@pytest.mark.parametrize("configured, open_files, expected, capped, answering", [
    (100_000, None, 100_000, False, 1024),
    (0, None, None, False, 1024),               # 0: unlimited
    (100_000, 1024, 840, True, 120),            # 1024 - 64 reserved = 960: 120 answering, 840 admitted
    (50, 1024, 50, False, 120),
    (0, 1024, 840, True, 120),
    (100_000, 40, 0, True, 0),                  # no room at all
])
def test_max_connections_fits_the_open_file_limit(configured, open_files, expected, capped, answering):
    admission = Admission(Config(max_connections=configured), Metrics(), open_files)
    assert (admission.max_connections, admission.capped_by_open_files) == (expected, capped)
    assert admission.max_answering == answering


async def _upgrade(port: int) -> tuple[int, RawClient]:
    """An upgrade request on /ws, kept open; the answer's status."""
    raw = await RawClient.connect(port, "/ws")
    return int(raw.handshake.split(" ", 2)[1]), raw


async def test_serve_lifts_the_open_file_limit_and_answers_503_past_it():
    """Started with a soft limit of 150 open files and a hard one of 300,
    ``wirehub serve`` takes all 300: 236 left after the reserve, 29 of them
    for refusals being answered, 207 connections. The 208th is answered 503
    and counted, not reset by a failed accept()."""
    def low_limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (150, 300))

    with start_server("--max-connections-per-ip", "0", "--new-connections-per-ip-per-s", "0",
                      preexec_fn=low_limits) as (_, port):
        held = []
        try:
            for n in range(207):                    # past the soft limit it started with
                status, raw = await _upgrade(port)
                assert status == 101, f"connection {n + 1} answered {status}"
                held.append(raw)
            status, extra = await _upgrade(port)
            extra.writer.close()
            assert status == 503
            held.pop().writer.close()               # a free slot, for /metrics, once the server sees the close
            deadline, refused = time.monotonic() + 10, 1
            while (answer := await http_get(port, "/metrics"))[0] == 503 and time.monotonic() < deadline:
                refused += 1
                await asyncio.sleep(0.01)
            status, _, body = answer
            assert status == 200
            assert f'wirehub_refusals_total{{reason="max_connections"}} {refused}'.encode() in body
        finally:
            for raw in held:
                raw.writer.close()


async def test_connection_limits_answer_503_and_429(impl):
    async with running_gateway(impl.name, max_connections=3, max_connections_per_ip=0) as gw:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(3):
                await stack.enter_async_context(client(gw))
            status, headers, _ = await http_get(gw.port)
            assert status == 503 and headers["Retry-After"] == "1"
        await until(lambda: gw.admission.open == 0, what="the slots released")
        async with client(gw):  # slots are released on close
            pass
    async with running_gateway(impl.name, max_connections_per_ip=2) as gw:
        async with client(gw), client(gw):
            status, _, body = await http_get(gw.port)
            assert status == 429 and b"too many connections from this address" in body
        assert 'wirehub_refusals_total{reason="max_connections_per_ip"} 1' in await metrics_text(gw.port)


async def test_refused_sockets_waiting_for_an_answer_are_bounded(impl):
    """Refused sockets that send nothing are held for their answer only up
    to ``max_answering``; past it they are dropped at once."""
    async with running_gateway(impl.name, max_connections=1, max_connections_per_ip=0) as gw, \
            client(gw):
        gw.admission.max_answering = 2
        silent = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(2)]
        reader, _ = await asyncio.open_connection("127.0.0.1", gw.port)  # the third: dropped
        assert await asyncio.wait_for(reader.read(), 2) == b""
        for r, _ in silent:  # the first two are still waiting for their request
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(r.read(1), 0.2)
        r, w = silent[0]
        w.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(r.read(), 2)).startswith(b"HTTP/1.1 503 ")
        await until(lambda: gw.admission.answering == 1, what="its place free again")
        status, _, _ = await http_get(gw.port)
        assert status == 503
        for _, w in silent:
            w.close()
        await until(lambda: gw.admission.answering == 0, what="every place free")
    assert gw.metrics.refusals_total["max_connections"] == 4


async def test_connection_flood_from_one_ip_is_rate_limited(impl):
    async with running_gateway(impl.name, new_connections_per_ip_per_s=2, new_connections_burst_per_ip=5) as gw:
        statuses = await asyncio.gather(*(http_get(gw.port) for _ in range(20)))
        codes = sorted(s for s, _, _ in statuses)
        assert codes.count(101) == 5 and codes.count(429) == 15
        assert all(h.get("Retry-After") == "1" for s, h, _ in statuses if s == 429)
        # (/metrics over HTTP would be rate-limited too: read the counters directly.)
        assert gw.metrics.refusals_total["connection_rate"] == 15


async def test_oversized_headers_get_431(impl):
    async with running_gateway(impl.name, max_header_bytes=2048) as gw:
        status, _, body = await http_get(gw.port, headers={"X-Padding": "a" * 4000})
        assert status == 431 and b"larger than 2048 bytes" in body
        status, _, _ = await http_get(gw.port, headers={"X-Padding": "a" * 1000})
        assert status == 101
        assert 'wirehub_refusals_total{reason="header_too_large"} 1' in await metrics_text(gw.port)


async def test_allowed_origins():
    async with running_gateway(allowed_origins=["https://app.example"]) as gw:
        assert (await http_get(gw.port, headers={"Origin": "https://evil.example"}))[0] == 403
        assert (await http_get(gw.port, headers={"Origin": "https://app.example"}))[0] == 101
        assert (await http_get(gw.port))[0] == 101  # not a browser: no Origin header
        assert 'wirehub_refusals_total{reason="origin"} 1' in await metrics_text(gw.port)


async def test_max_subscriptions_and_channel_length_hold_for_patterns():
    async with running_gateway(max_subscriptions_per_connection=2, max_channel_length=16) as gw, client(gw) as c:
        await c.subscribe("a.*")
        await c.subscribe("b")
        assert (await c.request(type="subscribe", channel="c.**"))["code"] == "too_many_subscriptions"
        await c.request(type="unsubscribe", channel="b")
        assert (await c.request(type="subscribe", channel="x." + "*." * 10 + "y"))["code"] == "invalid_channel"


# -- TLS -----------------------------------------------------------------------------

def _self_signed(tmp_path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


async def test_tls_serves_wss(tmp_path, impl):
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(cafile=cert)
    async with running_gateway(impl.name, tls_cert=cert, tls_key=key, jwt_secret=SECRET) as gw:
        url = f"wss://localhost:{gw.port}/ws?token={token(subscribe=['t'], publish=['t'])}"
        async with websockets.connect(url, ssl=context) as a, websockets.connect(url, ssl=context) as b:
            for ws in (a, b):
                assert json.loads(await ws.recv())["type"] == "welcome"
                await ws.send(json.dumps({"type": "subscribe", "channel": "t"}))
                assert json.loads(await ws.recv())["type"] == "subscribed"
            big = "x" * 200_000  # several TLS records, through the batched send path
            await a.send(json.dumps({"type": "publish", "channel": "t", "data": big}))
            for ws in (a, b):
                assert json.loads(await ws.recv())["data"] == big
        with pytest.raises(ssl.SSLCertVerificationError):  # plain trust store: self-signed refused
            async with websockets.connect(url, ssl=ssl.create_default_context()):
                pass


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the listen queue")
async def test_listen_backlog_sizes_the_kernel_accept_queue():
    # A reconnect storm after a restart fills the accept queue faster than one
    # loop accepts; a queue of 100 (asyncio's default) drops SYNs and those
    # clients retry a second later. For a listening socket, ss's Send-Q is
    # the queue's size.
    somaxconn = int(open("/proc/sys/net/core/somaxconn").read())
    for backlog in (777, 4096):
        async with running_gateway(listen_backlog=backlog) as gw:
            out = subprocess.run(["ss", "-Hltn", f"sport = :{gw.port}"], capture_output=True,
                                 text=True, check=True).stdout.split()
            assert int(out[2]) == min(backlog, somaxconn)
