"""An uploader that ignores the window (tests/test_files.py): it sends every
chunk of one file as fast as the socket takes them, then reads the acks,
then ends the file and prints the gateway's answer as JSON.

Usage: python tests/file_blaster.py PORT CHUNKS CHUNK_BYTES
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

from websockets.sync.client import connect

from wirehub.protocol.codec import TlvCodec


def main() -> None:
    port, chunks, chunk_bytes = (int(arg) for arg in sys.argv[1:4])
    body = os.urandom(chunk_bytes)   # every chunk the same: the file is CHUNKS copies
    digest = hashlib.sha256()
    for _ in range(chunks):
        digest.update(body)
    file_id = os.urandom(16)
    with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, compression=None) as ws:
        ws.recv()  # welcome
        ws.send(json.dumps({"type": "file_begin", "id": 1, "file_id": file_id.hex(), "name": "blast.bin",
                            "size": chunks * chunk_bytes, "sha256": digest.hexdigest(),
                            "chunk_size": chunk_bytes}))
        ready = json.loads(ws.recv())
        assert ready["type"] == "file_ready", ready
        for index in range(chunks):
            ws.send(TlvCodec.encode_chunk(file_id, index, chunks, body))
        for _ in range(chunks):
            ack = ws.recv()
            assert isinstance(ack, bytes) and b"file_ack" in ack, ack
        ws.send(json.dumps({"type": "file_end", "id": 2, "file_id": file_id.hex()}))
        print(ws.recv(timeout=60))


if __name__ == "__main__":
    main()
