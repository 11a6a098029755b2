"""The Autobahn fuzzingserver's peer: an echo client on ``wirehub.Client``'s wire.

``tools/autobahn/run.py --client`` starts ``wstest -m fuzzingserver`` and
then this agent, which

1. asks for the number of cases (``/getCaseCount``),
2. runs each one (``/runCase?case=N&agent=AGENT``), sending every message
   it receives back with the same type,
3. asks for the reports (``/updateReports?agent=AGENT&shutdownOnComplete=true``,
   after which wstest exits).

Every connection is ``wirehub.client_wire.connect`` with a ``ClientWire``,
the receive path, permessage-deflate offer and answer check, compression
and close handling that ``wirehub.Client`` runs on; only ``on_message`` is
the agent's own. The report therefore grades the Client's wire layer.

Run by hand against a fuzzingserver already listening::

    python tools/autobahn/client_echo.py ws://127.0.0.1:9001 [--agent NAME] [--pure]

Exit status: 0 when every case ran (whatever the verdicts: the report says),
2 when the fuzzingserver could not be reached or a case hung.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from typing import Any

from picows import WSError

from wirehub import _speedups
from wirehub.client_wire import ClientWire, ExtensionRejected, connect

# The suite's largest message (9.1.6, 9.2.6): 16 MiB, the Client's default limit too.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# The suite times out its own cases (at most 480 s for the 12.*/13.* ones);
# a connection still open well past that is a hang.
CASE_TIMEOUT_S = 600.0
STARTUP_TIMEOUT_S = 30.0


class Echo(ClientWire):
    """Send every message back as it came: same type, same bytes."""

    def on_message(self, opcode: int, payload: bytes) -> None:
        self.send(opcode, payload)


class FirstMessage(ClientWire):
    """Keep the first message (the case count)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_message(self, opcode: int, payload: bytes) -> None:
        if not self.first.done():
            self.first.set_result(payload)


async def _session(url: str, listener: type[ClientWire], impl: Any) -> ClientWire:
    """One connection, from the handshake to its end; return its listener."""
    transport, wire = await connect(url, listener, max_message_bytes=MAX_MESSAGE_BYTES, impl=impl)
    try:
        await asyncio.wait_for(asyncio.shield(wire.closed), CASE_TIMEOUT_S)
    except TimeoutError:
        transport.disconnect(False)
        raise
    return wire


async def case_count(base: str, impl: Any) -> int:
    """``/getCaseCount``, retried until the fuzzingserver listens."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            wire = await _session(f"{base}/getCaseCount", FirstMessage, impl)
            return int(await asyncio.wait_for(wire.first, 1))  # type: ignore[attr-defined]
        except (OSError, WSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def run(base: str, agent: str, impl: Any) -> int:
    try:
        count = await case_count(base, impl)
    except (OSError, WSError, TimeoutError, ValueError) as exc:
        print(f"client_echo: no case count from {base}: {exc!r}", file=sys.stderr)
        return 2
    status = 0
    for case in range(1, count + 1):
        try:
            await _session(f"{base}/runCase?case={case}&agent={agent}", Echo, impl)
        except TimeoutError:
            print(f"client_echo: case {case} still open after {CASE_TIMEOUT_S:.0f}s", file=sys.stderr)
            status = 2
        except (OSError, WSError, ExtensionRejected) as exc:
            # The suite grades the case from its side (a handshake it never
            # completed is FAILED there); say why here.
            print(f"client_echo: case {case}: {exc!r}", file=sys.stderr)
    with contextlib.suppress(OSError, WSError, TimeoutError):
        await _session(f"{base}/updateReports?agent={agent}&shutdownOnComplete=true", ClientWire, impl)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the fuzzingserver, e.g. ws://127.0.0.1:9001")
    parser.add_argument("--agent", default="wirehub-client", help="agent name in the report")
    parser.add_argument("--pure", action="store_true", help="the pure-Python hot path (wirehub._pure)")
    args = parser.parse_args(argv)
    # picows logs every protocol error the fuzzer provokes; keep the log readable.
    logging.basicConfig(level=logging.CRITICAL)
    impl = _speedups.load("pure" if args.pure else "ext")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a wirehub dependency
        runner = asyncio.run
    return runner(run(args.url.rstrip("/"), args.agent, impl))


if __name__ == "__main__":
    sys.exit(main())
