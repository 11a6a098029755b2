"""``wirehub.js`` uploads (``tests/js/upload.test.mjs``) in Node against a
gateway with a ``file_dir``, run in this test's event loop so that the
suite's control messages reach into it: ``ctl_close_me`` closes the
caller's connection with 1012 (``test_js_client.control_handlers``),
``ctl_drop_me`` drops its TCP connection without a close frame.

The gateway's window is 4 chunks and its inbound limit 16 MiB/s after a
4 MiB burst, so an 8 MiB upload is paced, has chunks in flight when a
connection is cut, and lasts long enough to be cut twice. A second
gateway, limited to 2 MiB/s after a 2 MiB burst, is where the suite's own
publications leave too little of the burst for the chunks the client's
pacer allows: the gateway refuses some unread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from wirehub import Gateway

from helpers import free_port, running_gateway
from test_js_client import KEEP_ALL, LIMITS_OFF, control_handlers, node, run_node  # noqa: F401 (node: a fixture)

MiB = 1024 * 1024


def drop_handler(gw: Gateway) -> None:
    @gw.on("ctl_drop_me")
    def drop_me(conn: Any, msg: dict[str, Any]) -> None:
        transport = conn.listener.transport.underlying_transport
        asyncio.get_running_loop().call_soon(transport.abort)


async def test_node_uploads_through_dropped_connections(node, tmp_path):
    api_port = free_port()
    fast = {**LIMITS_OFF, "rate_limit_bytes_per_s": 16 * MiB, "rate_limit_burst_bytes": 4 * MiB}
    slow = {**LIMITS_OFF, "rate_limit_bytes_per_s": 2 * MiB, "rate_limit_burst_bytes": 2 * MiB}
    async with running_gateway(channels=KEEP_ALL, file_dir=str(tmp_path / "fast"), file_window=4,
                               api_port=api_port, **fast) as gw, \
            running_gateway(file_dir=str(tmp_path / "slow"), file_window=4, **slow) as slow_gw:
        control_handlers(gw)
        drop_handler(gw)
        await run_node(node, "upload.test.mjs", {
            "WIREHUB_URL": f"ws://127.0.0.1:{gw.port}/ws",
            "WIREHUB_FILE_DIR": str(tmp_path / "fast"),
            "WIREHUB_API_URL": f"http://127.0.0.1:{api_port}",
            "WIREHUB_SLOW_URL": f"ws://127.0.0.1:{slow_gw.port}/ws",
            "WIREHUB_SLOW_FILE_DIR": str(tmp_path / "slow"),
        }, timeout_s=50)
