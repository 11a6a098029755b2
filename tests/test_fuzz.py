"""Fuzzing what a client controls: the JSON and TLV decoders, the JWT path and
the frame reassembler.

Inputs are random bytes and mutations (flips, insertions, deletions, cuts,
splices) of the seed corpus in ``tests/fuzz_corpus/``. The contract: a
decoder either returns a message or raises one of its documented errors --
never another exception, never a hang, never an allocation out of
proportion to the input; the gateway answers every byte stream with
messages and/or a close with a valid RFC 6455 code, and keeps serving.

CI runs a short budget with the rest of the suite; a long run is::

    WIREHUB_FUZZ_EXAMPLES=200000 python -m pytest -m fuzz tests/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import json
import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wirehub import _speedups
from wirehub.auth import TokenVerifier, mint_token
from wirehub.protocol.codec import JsonCodec, TlvCodec
from wirehub.protocol.errors import AuthError, WirehubError

from helpers import RawClient, json_client, running_gateway

pytestmark = pytest.mark.fuzz

CORPUS = Path(__file__).parent / "fuzz_corpus"
EXAMPLES = int(os.environ.get("WIREHUB_FUZZ_EXAMPLES", "1500"))
# Network examples each open a connection: a tenth of the budget.
NETWORK_EXAMPLES = max(20, EXAMPLES // 10)
# Valid close codes a server may send (RFC 6455 §7.4).
CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1013}


def _seeds(name: str) -> list[bytes]:
    lines = [line for line in (CORPUS / name).read_text().splitlines() if line and not line.startswith("#")]
    return [bytes.fromhex(line) if name.endswith(".hex") else line.encode() for line in lines]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed, damaged a few times over; or, now and then, plain random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=512))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and data:
            data[pos % len(data)] = draw(st.integers(0, 255))
        elif op == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == 3:
            data = data[:pos]
        else:
            other = draw(st.sampled_from(seeds))
            data[pos:pos] = other[draw(st.integers(0, len(other))):]
    return bytes(data)


def _budget(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _bounded_allocation(fn, data: bytes) -> None:
    """Run ``fn(data)``; its peak allocation must stay proportional to the input."""
    tracemalloc.start()
    try:
        fn(data)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 64 * len(data) + 256 * 1024, (peak, len(data))


@_budget(EXAMPLES)
@given(mutated(_seeds("json.txt")))
def test_json_decoder(data):
    codec = JsonCodec({"custom_thing"})

    def decode(payload: bytes) -> None:
        try:
            codec.decode(payload)
        except WirehubError:
            pass

    _bounded_allocation(decode, data)


@pytest.mark.parametrize("impl_name", ["ext", "pure"])
def test_tlv_decoder(impl_name):
    codec = TlvCodec(_speedups.load(impl_name).tlv, {"custom_thing"})

    @_budget(EXAMPLES)
    @given(mutated(_seeds("tlv.hex")))
    def run(data):
        def decode(payload: bytes) -> None:
            try:
                codec.decode(payload)
            except WirehubError:
                pass

        _bounded_allocation(decode, data)

    run()


SECRET = "fuzz-secret-long-enough-for-hs256-tokens"


@_budget(EXAMPLES // 2)
@given(mutated([mint_token(SECRET, sub="alice", subscribe=["a.*"]).encode(),
                mint_token(SECRET, sub="bob", permissions=["admin"], ttl_s=1).encode()]))
def test_jwt_verifier(data):
    verifier = TokenVerifier(secret=SECRET)
    try:
        principal = verifier.verify(data.decode("utf-8", "replace"))
    except AuthError:
        return
    # Only an untouched signature verifies, so only the minted claims can come back.
    assert principal.sub in ("alice", "bob")


@pytest.mark.parametrize("impl_name", ["ext", "pure"])
async def test_frame_reassembler(impl_name):
    """Damaged frame streams against /ws and /echo: each ends in messages and/or
    a close with a valid code; the gateway keeps answering afterwards."""
    seeds = _seeds("frames.hex")
    async with running_gateway(impl_name, echo=True, max_payload_bytes=4096, high_water_bytes=65536,
                               rate_limit_violations_per_s=0) as gw:
        samples = []

        @_budget(NETWORK_EXAMPLES)
        @given(mutated(seeds), st.sampled_from(["/ws", "/echo"]))
        def collect(data, path):
            samples.append((data, path))

        collect()
        async with json_client(gw) as control:
            for i, (data, path) in enumerate(samples):
                client = await RawClient.connect(gw.port, path)
                client.writer.write(data)
                code = await _outcome(client, expect_json=path == "/ws")
                assert code is None or code in CLOSE_CODES, (code, data.hex(), path)
                # A connection left open may be waiting for the rest of a frame;
                # the gateway itself must still answer (a hang fails here).
                assert await control.request(type="ping", id=i) == {"type": "pong", "id": i}, data.hex()
                client.writer.close()
        async with json_client(gw) as c:  # still serving, state intact
            assert await c.request(type="ping", id=1) == {"type": "pong", "id": 1}
            for _ in range(100):  # every fuzzed connection is gone, none leaked
                if gw.metrics.connections_current == 1:
                    break
                await asyncio.sleep(0.05)
            assert gw.metrics.connections_current == 1


async def _outcome(client: RawClient, expect_json: bool) -> int | None:
    """Read until the server closes or goes quiet; the close code, if any
    (quiet is not success on its own: the caller then checks the gateway answers)."""
    try:
        while True:
            opcode, payload = await client.frame(timeout=0.1)
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big") if payload else None
            assert opcode in (0x1, 0x2, 0x9, 0xA), opcode
            if opcode == 0x1 and expect_json:
                json.loads(payload)  # every text frame /ws sends is valid JSON
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        return None
