"""``wirehub.js`` in headless Chromium against a live gateway.

The browser is Debian's ``chromium`` (``tests/browser/install-chromium.sh``
installs it on first use), driven by Playwright with ``executable_path``:
nothing downloads a browser. The page imports the client from the
gateway's ``/wirehub.js`` from another origin, as an application page
would (so the CORS header is tested too). Without a browser the tests are
skipped with the reason, except under CI (``CI`` set), where that is a
failure. The Node tests of the same client are ``tests/test_js_client.py``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from test_js_client import KEEP_ALL, LIMITS_OFF, control_handlers

from helpers import running_gateway

INSTALL = Path(__file__).parent / "browser" / "install-chromium.sh"


def chromium_path() -> str:
    try:
        import playwright.async_api  # noqa: F401 (a test dependency; imported where it is used)
        result = subprocess.run(["bash", str(INSTALL)], check=False, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip()[-2000:])
        return result.stdout.strip()
    except (ImportError, RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        reason = f"no browser for the wirehub.js tests: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_path()


@contextlib.asynccontextmanager
async def browser_page(chromium: str) -> AsyncIterator[Any]:
    """A page in a fresh headless Chromium; fails the test on any uncaught page error."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page
            assert not errors, errors
        finally:
            await browser.close()


async def load_client(page: Any, port: int) -> None:
    """Import the client into an about:blank page (a foreign origin) as ``window.wirehub``."""
    await page.evaluate("async (url) => { window.wirehub = await import(url); }",
                        f"http://127.0.0.1:{port}/wirehub.js")


async def test_the_browser_client_publishes_receives_and_asks(chromium):
    async with running_gateway(channels=KEEP_ALL, **LIMITS_OFF) as gw, browser_page(chromium) as page:
        control_handlers(gw)
        await load_client(page, gw.port)
        result = await page.evaluate("""async (url) => {
            const client = await wirehub.connect(url);
            const sub = await client.subscribe("prices.btc");
            const json = await client.publish("prices.btc", { bid: 101.5 });
            const binary = await client.publish("prices.btc", new Uint8Array([0, 255, 7]));
            const it = sub[Symbol.asyncIterator]();
            const first = (await it.next()).value, second = (await it.next()).value;
            const sum = await client.request({ type: "add", a: 2, b: 3 });
            const state = client.state;
            await client.close();
            return { json, binary, first, second: [second.offset, Array.from(second.data)],
                     sum: sum.value, state, after: client.state };
        }""", f"ws://127.0.0.1:{gw.port}/ws")
    assert result["json"]["offset"] == 1 and result["binary"]["offset"] == 2
    assert result["first"] == {"channel": "prices.btc", "offset": 1, "data": {"bid": 101.5}}
    assert result["second"] == [2, [0, 255, 7]]
    assert (result["sum"], result["state"], result["after"]) == (5, "connected", "closed")


async def test_the_browser_client_sees_every_offset_once_through_ten_restarts(chromium):
    """The fault-injection test of the Node suite, in the browser: 5,000
    publications/s, every connection closed with 1012 ten times."""
    total, own = 10_000, 200
    async with running_gateway(channels=KEEP_ALL, **LIMITS_OFF) as gw, browser_page(chromium) as page:
        control_handlers(gw)
        await load_client(page, gw.port)
        result = await page.evaluate("""async ([url, total, own]) => {
            const client = await wirehub.connect(url, { reconnectIntervalMs: 20, maxReconnectIntervalMs: 200 });
            let restarts = 0;
            client.on("state", (state, code) => { if (state === "disconnected" && code === 1012) restarts++; });
            const feed = await client.subscribe("feed"), mine = await client.subscribe("mine");
            await client.request({ type: "ctl_feed", channel: "feed", total, rate: 5000, restarts: 10 });
            const acknowledged = [];
            for (let n = 0; n < own; n++) {
                acknowledged.push((await client.publish("mine", { n })).offset);
                await new Promise((resolve) => setTimeout(resolve, 1));
            }
            const read = async (sub, n) => {
                const got = [];
                for await (const msg of sub) { got.push(msg); if (got.length === n) break; }
                return got;
            };
            const received = await read(feed, total), ownReceived = await read(mine, own);
            await client.request({ type: "ctl_feed_done" }, { timeoutMs: 60000 });
            const position = await client.request({ type: "ctl_position", channel: "mine" });
            await client.close();
            return { offsets: received.map((m) => m.offset), data: received.map((m) => m.data),
                     ownOffsets: ownReceived.map((m) => m.offset), ownData: ownReceived.map((m) => m.data.n),
                     acknowledged, restarts, position: position.offset };
        }""", [f"ws://127.0.0.1:{gw.port}/ws", total, own])
    expected = list(range(1, total + 1))
    assert result["offsets"] == expected and result["data"] == expected
    assert result["ownOffsets"] == list(range(1, own + 1))
    assert sorted(result["ownData"]) == list(range(own))
    assert sorted(result["acknowledged"]) == list(range(1, own + 1))
    assert result["restarts"] == 10 and result["position"] == own
