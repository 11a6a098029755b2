"""File transfer (docs/protocol.md, "File transfer"): resumable, checksummed
uploads over the binary protocol, and downloads over the HTTP listener.

Real gateways on loopback, real clients: ``wirehub.Client`` for uploads that
survive cuts, a `websockets` client for the protocol's errors (raw frames
the library would never send), a subprocess that ignores the window for the
memory bound, and raw HTTP for downloads.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

import wirehub
from wirehub import Config, Gateway
from wirehub._speedups import load
from wirehub.clock import ManualClock
from wirehub.files import FileStore, StoredFile
from wirehub.protocol.codec import TlvCodec
from wirehub.protocol.messages import FileChunk

from helpers import json_client, metrics_text, rss_kib, running_gateway, until

KiB, MiB = 1024, 1024 * 1024
SECRET = "file-transfer-test-secret-long-enough-for-hs256"
BLASTER = Path(__file__).parent / "file_blaster.py"


def token(sub: str, **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600, **claims}, SECRET, algorithm="HS256")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def outside(directory: Path) -> set[str]:
    """Every path under ``directory``'s parent that is not under ``directory``."""
    return {str(p) for p in directory.parent.rglob("*") if directory not in p.parents and p != directory}


class Cutter:
    """Middleware: count the chunks the gateway receives, and close the
    connection (1012) the first time each index in ``cut_at`` arrives."""

    def __init__(self, cut_at: set[int]) -> None:
        self.cut_at = set(cut_at)
        self.received: collections.Counter[int] = collections.Counter()

    def __call__(self, conn: wirehub.Connection, msg: Any) -> None:
        if isinstance(msg, FileChunk):
            self.received[msg.index] += 1
            if msg.index in self.cut_at:
                self.cut_at.discard(msg.index)
                conn.close(1012, "cut by the test")


async def test_a_64_mib_upload_cut_three_times_arrives_whole_and_resends_only_what_was_missing(
        impl_name: str, tmp_path: Path) -> None:
    data = random.Random(7).randbytes(64 * MiB)
    chunk_size = 256 * KiB
    count = len(data) // chunk_size
    cutter = Cutter(set(random.Random(11).sample(range(10, count - 10), 3)))
    files = tmp_path / "files"
    async with running_gateway(impl_name, file_dir=str(files), rate_limit_bytes_per_s=0) as gw:
        gw.use(cutter)
        window = gw.config.file_window
        progress: list[int] = []
        async with wirehub.connect(f"ws://127.0.0.1:{gw.port}/ws", reconnect_interval_s=0.01) as client:
            result = await client.upload(data, name="artifact.bin", chunk_size=chunk_size,
                                         on_progress=lambda acked, total: progress.append(acked))
        errors = gw.metrics.errors_total
    assert result.sha256 == sha256(data) and result.size == len(data)
    assert (files / f"{result.file_id}.data").read_bytes() == data
    assert not cutter.cut_at, "every cut happened"
    assert result.attempts == 4
    # The gateway took every chunk exactly once: a resumed attempt sent only
    # what the gateway did not hold; what the client sent again is what a
    # cut lost on the way (at most the window, each time).
    assert cutter.received == collections.Counter(range(count))
    assert 0 <= result.chunks_sent - count <= 3 * window
    assert errors["duplicate_chunk"] == 0
    assert progress[-1] == len(data)


async def test_an_upload_resumes_after_a_gateway_restart_from_the_chunks_on_disk(tmp_path: Path) -> None:
    data = os.urandom(40 * KiB + 123)
    file_id = os.urandom(16)
    async with running_gateway(file_dir=str(tmp_path)) as gw, json_client(gw) as ws:
        ready = await begin(ws, file_id, data, chunk_size=4 * KiB)
        assert ready["have"] == [] and ready["chunk_count"] == 11
        for index in (0, 1, 2, 5):
            await ws.ws.send(chunk(file_id, index, 11, data, 4 * KiB))
        acks = {(await recv_tlv(ws))["index"] for _ in range(4)}
        assert acks == {0, 1, 2, 5}
    async with running_gateway(file_dir=str(tmp_path)) as gw:
        async with wirehub.connect(f"ws://127.0.0.1:{gw.port}/ws") as client:
            result = await client.upload(data, name="f.bin", file_id=file_id, chunk_size=4 * KiB)
    assert result.chunks_sent == 11 - 4
    assert (tmp_path / f"{file_id.hex()}.data").read_bytes() == data


async def test_completion_publishes_on_the_channel_and_calls_on_file(tmp_path: Path) -> None:
    stored: list[StoredFile] = []
    data = b"build log\n" * 1000
    async with running_gateway(file_dir=str(tmp_path)) as gw:
        gw.on_file(stored.append)
        async with wirehub.connect(f"ws://127.0.0.1:{gw.port}/ws") as client:
            sub = await client.subscribe("artifacts")
            result = await client.upload(data, name="build.log", channel="artifacts", chunk_size=4 * KiB)
            announced = await asyncio.wait_for(sub.__anext__(), 5)
    assert announced.data == {"type": "file", "file_id": result.file_id, "name": "build.log",
                              "size": len(data), "sha256": sha256(data)}
    assert result.channel == "artifacts"
    assert [s.file_id for s in stored] == [result.file_id]
    assert stored[0].path.read_bytes() == data and stored[0].path.parent == tmp_path


async def test_a_complete_file_begun_again_is_answered_done_without_a_chunk(tmp_path: Path) -> None:
    data = os.urandom(10 * KiB)
    file_id = os.urandom(16)
    async with running_gateway(file_dir=str(tmp_path)) as gw:
        async with wirehub.connect(f"ws://127.0.0.1:{gw.port}/ws") as client:
            first = await client.upload(data, name="a.bin", file_id=file_id, chunk_size=1 * KiB)
            again = await client.upload(data, name="a.bin", file_id=file_id, chunk_size=1 * KiB)
    assert (first.chunks_sent, again.chunks_sent) == (10, 0)
    assert again.sha256 == first.sha256


async def test_an_untouched_partial_upload_is_deleted_after_its_ttl(tmp_path: Path) -> None:
    clock = ManualClock()
    store = FileStore(tmp_path, max_bytes=MiB, quota_bytes=0, partial_ttl_s=100, max_chunk_bytes=64 * KiB,
                      clock=clock)
    gw = Gateway(Config(port=0), files=store, clock=clock)
    data = os.urandom(8 * KiB)
    file_id = os.urandom(16)
    async with running_gateway(gateway=gw), json_client(gw) as ws:
        await begin(ws, file_id, data, chunk_size=4 * KiB)
        await ws.ws.send(chunk(file_id, 0, 2, data, 4 * KiB))
        assert (await recv_tlv(ws))["type"] == "file_ack"
        assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".part", ".chunks"}
        clock.advance(99)
        assert (await begin(ws, file_id, data, chunk_size=4 * KiB))["have"] == [[0, 0]]
        clock.advance(101)   # untouched since that begin: past the TTL
        await until(lambda: not any(tmp_path.iterdir()), what="the partial upload deleted")
        assert (await begin(ws, file_id, data, chunk_size=4 * KiB))["have"] == []


# -- the protocol's errors: each its own code, the connection stays usable --------------

def chunk(file_id: bytes, index: int, count: int, data: bytes, chunk_size: int, *, body: bytes | None = None) -> bytes:
    part = data[index * chunk_size:(index + 1) * chunk_size] if body is None else body
    return TlvCodec.encode_chunk(file_id, index, count, part)


async def recv_tlv(ws: Any) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.ws.recv(), 5)
    assert isinstance(raw, bytes), raw
    return TlvCodec(load("ext").tlv).decode_fields(raw)


async def begin(ws: Any, file_id: bytes, data: bytes, *, chunk_size: int, name: str = "f.bin",
                sha: str | None = None, **extra: Any) -> dict[str, Any]:
    return await ws.request(type="file_begin", id="b", file_id=file_id.hex(), name=name, size=len(data),
                            sha256=sha or sha256(data), chunk_size=chunk_size, **extra)


async def still_usable(ws: Any) -> None:
    assert await ws.request(type="ping", id="alive") == {"type": "pong", "id": "alive"}


async def test_each_bad_upload_gets_its_own_error_code_and_nothing_lands_outside_the_directory(
        impl_name: str, tmp_path: Path) -> None:
    files = tmp_path / "files"
    before = outside(files)
    data = os.urandom(10 * KiB)
    size = 4 * KiB
    async with running_gateway(impl_name, file_dir=str(files), file_max_bytes=MiB,
                               file_quota_bytes=2 * MiB) as gw, json_client(gw) as ws:
        fid = os.urandom(16)
        assert (await begin(ws, fid, data, chunk_size=size))["chunk_count"] == 3
        seen: dict[str, dict[str, Any]] = {}

        async def refused(frame: bytes) -> None:
            await ws.ws.send(frame)
            reply = await recv_tlv(ws)
            assert reply["type"] == "error", reply
            seen[reply["code"]] = reply
            await still_usable(ws)

        await refused(chunk(fid, 3, 3, data, size, body=b"x" * 10))            # index past the count
        await refused(chunk(fid, 0, 4, data, size))                            # the wrong count
        await refused(chunk(fid, 2, 3, data, size, body=b"y" * (size + 1)))    # past size
        await ws.ws.send(chunk(fid, 0, 3, data, size))
        assert (await recv_tlv(ws)) == {"type": "file_ack", "file_id": fid.hex(), "index": 0}
        await refused(chunk(fid, 0, 3, data, size))                            # again
        await refused(chunk(os.urandom(16), 0, 1, data, size))                 # no such upload
        assert seen["invalid_chunk"]["file_id"] == fid.hex() and seen["invalid_chunk"]["index"] == 0
        assert seen["chunk_out_of_range"]["index"] == 2
        assert seen["duplicate_chunk"]["index"] == 0
        assert set(seen) == {"invalid_chunk", "chunk_out_of_range", "duplicate_chunk", "unknown_file"}

        incomplete = await ws.request(type="file_end", id="e", file_id=fid.hex())
        assert incomplete["code"] == "incomplete_file" and "2 of 3 chunks missing: 1-2" in incomplete["error"]
        await still_usable(ws)

        wrong = os.urandom(16)
        await begin(ws, wrong, data, chunk_size=size, sha="0" * 64)
        for index in range(3):
            await ws.ws.send(chunk(wrong, index, 3, data, size))
            assert (await recv_tlv(ws))["type"] == "file_ack"
        mismatch = await ws.request(type="file_end", id="e", file_id=wrong.hex())
        assert mismatch["code"] == "checksum_mismatch" and mismatch["file_id"] == wrong.hex()
        assert (await begin(ws, wrong, data, chunk_size=size, sha="0" * 64))["have"] == []  # emptied: resend all

        for name in ("../escape", "..", "a/b", "c\\d", "", "nul\x00", "x" * 256):
            reply = await begin(ws, os.urandom(16), data, chunk_size=size, name=name)
            assert reply["code"] == "invalid_name", (name, reply)
        assert (await begin(ws, os.urandom(16), os.urandom(MiB + 1), chunk_size=64 * KiB))["code"] == "file_too_large"
        big = os.urandom(MiB)
        assert "have" in await begin(ws, os.urandom(16), big, chunk_size=64 * KiB)
        assert (await begin(ws, os.urandom(16), big, chunk_size=64 * KiB))["code"] == "quota_exceeded"
        conflict = await begin(ws, fid, data, chunk_size=size, name="other.bin")
        assert conflict["code"] == "file_conflict"
        assert (await begin(ws, os.urandom(16), data, chunk_size=100))["code"] == "invalid_field"
        bad_id = await ws.request(type="file_begin", id="b", file_id="../../etc", name="n", size=1,
                                  sha256="0" * 64, chunk_size=KiB)
        assert bad_id["code"] == "invalid_field" and "file_id" in bad_id["error"]
        as_json = await ws.request(type="file_chunk", id="c", file_id=fid.hex(), index=1)
        assert as_json["code"] == "invalid_message"
        await still_usable(ws)
        counted = await metrics_text(gw.port)
    for code in ("invalid_chunk", "chunk_out_of_range", "duplicate_chunk", "unknown_file", "incomplete_file",
                 "checksum_mismatch", "invalid_name", "file_too_large", "quota_exceeded", "file_conflict"):
        assert f'wirehub_errors_total{{code="{code}"}}' in counted, code
    assert outside(files) == before
    assert all(p.name.split(".")[0] in {fid.hex(), wrong.hex()} or len(p.name.split(".")[0]) == 32
               for p in files.iterdir())


async def test_files_are_off_without_a_directory_and_need_the_upload_permission(tmp_path: Path) -> None:
    data = b"x" * 2000
    async with running_gateway() as gw, json_client(gw) as ws:
        assert (await begin(ws, os.urandom(16), data, chunk_size=KiB))["code"] == "files_disabled"
    async with running_gateway(file_dir=str(tmp_path), jwt_secret=SECRET) as gw:
        url = f"ws://127.0.0.1:{gw.port}/ws"
        headers = {"Authorization": f"Bearer {token('reader', subscribe=['**'])}"}
        async with json_client(gw, additional_headers=headers) as ws:
            refused = await begin(ws, os.urandom(16), data, chunk_size=KiB)
            assert refused["code"] == "forbidden" and "files:upload" in refused["error"]
        async with wirehub.connect(url, token=token("uploader", permissions=["files:upload"])) as client:
            with pytest.raises(wirehub.client.ServerError, match="forbidden"):
                await client.upload(data, name="x", channel="not-mine")
            assert (await client.upload(data, name="x")).size == 2000
    assert not any(p.suffix == ".part" for p in tmp_path.iterdir())


# -- flow control: a client that ignores the window ----------------------------------------

class SlowDisk(FileStore):
    """A disk that takes 20 ms per chunk: far slower than loopback."""

    def _write(self, file_id: str, offset: int, data: memoryview, index: int) -> None:
        time.sleep(0.02)
        super()._write(file_id, offset, data, index)


async def test_a_client_faster_than_the_disk_is_not_buffered_and_others_keep_being_served(
        impl_name: str, tmp_path: Path) -> None:
    chunks, chunk_size = 400, 256 * KiB   # 100 MiB, ignoring the window
    store = SlowDisk(tmp_path, max_bytes=1 << 30, quota_bytes=0, partial_ttl_s=3600,
                     max_chunk_bytes=MiB - 64)
    gw = Gateway(Config(port=0, rate_limit_bytes_per_s=0), files=store, implementation=impl_name)
    async with running_gateway(gateway=gw), json_client(gw) as other:
        baseline = rss_kib(os.getpid())
        blaster = await asyncio.create_subprocess_exec(
            sys.executable, str(BLASTER), str(gw.port), str(chunks), str(chunk_size),
            stdout=asyncio.subprocess.PIPE)
        peak = baseline
        pongs = 0
        done = asyncio.ensure_future(blaster.communicate())
        while not done.done():
            peak = max(peak, rss_kib(os.getpid()))
            await still_usable(other)
            pongs += 1
            await asyncio.wait([done], timeout=0.05)
        out, _ = done.result()
        assert blaster.returncode == 0, out
        result = json.loads(out)
        assert result["type"] == "file_done" and result["size"] == chunks * chunk_size
        assert store.metrics["read_pauses"] > 0
    # Held in memory at most: the window's chunks, one read buffer, the
    # allocator's slack. Unpaused, the gateway would hold most of 100 MiB.
    assert (peak - baseline) < 24 * 1024, f"RSS grew {(peak - baseline) // 1024} MiB"
    assert pongs > 0


# -- downloads --------------------------------------------------------------------------

async def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{lines}\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), parsed, body


async def test_downloads_with_range_for_the_uploader_and_the_channels_readers_only(tmp_path: Path) -> None:
    data = os.urandom(300 * KiB + 7)
    async with running_gateway(file_dir=str(tmp_path), jwt_secret=SECRET, api_port=0, api_jwt=True) as gw:
        uploader = token("ann", permissions=["files:upload"], publish=["builds.*"])
        async with wirehub.connect(f"ws://127.0.0.1:{gw.port}/ws", token=uploader) as client:
            result = await client.upload(data, name="report 1.pdf", channel="builds.42", chunk_size=64 * KiB)
        port, path = gw.http_api.port, f"/files/{result.file_id}"

        def bearer(tok: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {tok}"}

        status, headers, body = await http_get(port, path, bearer(uploader))
        assert (status, body) == (200, data)
        assert headers["accept-ranges"] == "bytes" and headers["etag"] == f'"{result.sha256}"'
        assert headers["content-disposition"] == "attachment; filename*=UTF-8''report%201.pdf"
        reader = bearer(token("bob", subscribe=["builds.*"]))
        status, headers, body = await http_get(port, path, {**reader, "Range": "bytes=1000-1999"})
        assert (status, body, headers["content-range"]) == (206, data[1000:2000], f"bytes 1000-1999/{len(data)}")
        status, _, body = await http_get(port, path, {**reader, "Range": "bytes=-7"})
        assert (status, body) == (206, data[-7:])
        status, _, body = await http_get(port, path, {**reader, "Range": "bytes=307000-"})
        assert (status, body) == (206, data[307000:])
        status, headers, _ = await http_get(port, path, {**reader, "Range": f"bytes={len(data)}-"})
        assert (status, headers.get("content-range")) == (416, f"bytes */{len(data)}"), headers
        status, _, body = await http_get(port, path, bearer(token("eve", subscribe=["other.*"])))
        assert status == 403 and json.loads(body)["code"] == "forbidden"
        assert (await http_get(port, path))[0] == 401
        assert (await http_get(port, "/files/" + "0" * 32, bearer(uploader)))[0] == 404
        assert (await http_get(port, "/files/../../etc/passwd", bearer(uploader)))[0] == 404
        status, _, body = await http_get(gw.port, path, bearer(uploader))   # the WebSocket port
        assert status == 404 and f"127.0.0.1:{port} (--api-port)" in json.loads(body)["error"]


async def test_a_download_resumes_with_range_on_a_keep_alive_connection(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 5)
    async with running_gateway(file_dir=str(tmp_path), api_port=0) as gw:
        async with wirehub.connect(f"ws://127.0.0.1:{gw.port}/ws") as client:
            result = await client.upload(data, name="big.bin")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_api.port)
        got = b""
        for first in (0, MiB):   # two ranges on one connection, as a resumed download asks
            last = first + MiB - 1
            writer.write(f"GET /files/{result.file_id} HTTP/1.1\r\nHost: t\r\nRange: bytes={first}-{last}\r\n\r\n"
                         .encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 206 ")
            got += await asyncio.wait_for(reader.readexactly(MiB), 10)
        writer.write(f"GET /files/{result.file_id} HTTP/1.1\r\nHost: t\r\nRange: bytes={2 * MiB}-\r\n"
                     f"Connection: close\r\n\r\n".encode())
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert got + rest.partition(b"\r\n\r\n")[2] == data


# -- the codec -------------------------------------------------------------------------------

def test_file_messages_round_trip_through_tlv(impl: Any) -> None:
    from wirehub.protocol.messages import FileAck, FileBegin, FileReady

    codec = TlvCodec(impl.tlv)
    fid = os.urandom(16)
    begin_msg = codec.decode(codec.encode_fields({"type": "file_begin", "file_id": fid, "name": "n.bin",
                                                  "size": 5, "sha256": "ab" * 32, "chunk_size": 1024,
                                                  "id": "7"}))
    assert begin_msg == FileBegin(fid.hex(), "n.bin", 5, "ab" * 32, 1024, "7")
    got = codec.decode(codec.encode_chunk(fid, 3, 9, b"payload"))
    assert isinstance(got, FileChunk) and (got.file_id, got.index, got.count, bytes(got.data)) == \
        (fid.hex(), 3, 9, b"payload")
    ready = codec.decode_fields(codec.encode(FileReady(fid.hex(), [(0, 2), (5, 5)], 9, 16, 0, 0, "7")))
    assert ready == {"type": "file_ready", "file_id": fid.hex(), "have": [[0, 2], [5, 5]], "chunk_count": 9,
                     "window": 16, "max_bytes_per_s": 0, "burst_bytes": 0, "id": "7"}
    assert codec.decode_fields(codec.encode(FileAck(fid.hex(), 4))) == \
        {"type": "file_ack", "file_id": fid.hex(), "index": 4}
    with pytest.raises(wirehub.WirehubError, match="at least 24 bytes"):
        codec.decode(codec.encode_fields({"type": "file_chunk", "chunk": b"short"}))


async def test_an_upload_over_the_connections_byte_rate_recovers_refused_chunks(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    taken = Cutter(set())
    async with running_gateway(file_dir=str(tmp_path), rate_limit_bytes_per_s=2 * MiB,
                               rate_limit_burst_bytes=512 * KiB) as gw:
        gw.use(taken)
        async with wirehub.connect(f"ws://127.0.0.1:{gw.port}/ws") as client:
            # A message of the application's spends the burst the pacer
            # counted on: chunks after it are refused unread, and the upload
            # learns from a new file_begin which ones.
            await client.publish("noise", b"n" * (400 * KiB))
            result = await client.upload(data, name="paced.bin", chunk_size=128 * KiB)
        refused = gw.metrics.errors_total["rate_limited"]
    assert (tmp_path / f"{result.file_id}.data").read_bytes() == data
    assert taken.received == collections.Counter(range(24))
    assert result.chunks_sent == 24 + refused
    assert (result.attempts > 1) == (refused > 0)
