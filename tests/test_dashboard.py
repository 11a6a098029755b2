"""The ``/dashboard`` page in headless Chromium against live gateways.

The browser is Debian's ``chromium`` driven by Playwright, as in
``tests/test_browser_client.py`` (whose fixture and page helper this module
reuses; without a browser the tests are skipped, except under CI). Every
page is watched: an uncaught error, a console error or a request to
anything but the gateway fails the test. Waits are Playwright's
(``expect`` polls the page until its timeout), never a sleep.

- metrics: a ``ManualClock`` gateway; the test publishes and advances the
  clock, the page's numbers, charts and busiest channels follow;
- login: ``?token=`` moves to ``sessionStorage``, a bad token is refused
  visibly, a keyed gateway without a token says it needs one;
- runners and logs on ordinary channels the test writes (``runners`` and
  ``logs:<id>`` shaped as ``docs/docker.md`` describes): the list, the log
  in order with stderr marked, the filter, pause and follow, a 1012 restart
  with lines published meanwhile (shown once), the buttons and their
  confirmation, and text that looks like HTML shown as text;
- the same against a real dockerd (``tests/docker_engine.py``): a runner
  started during the test, its log, a restart, and a stop click that stops it.

Screenshots of each state go to the test's ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import json_client, running_gateway, until
from test_browser_client import browser_page, chromium  # noqa: F401 (chromium: the fixture)
from test_js_client import KEEP_ALL, LIMITS_OFF

from wirehub import Config, Gateway
from wirehub.auth import mint_token
from wirehub.clock import ManualClock

SECRET = "dashboard-test-secret-long-enough-for-hs256!"
TIMEOUT_MS = 15_000
QUIET = {"ping_interval_s": 3600.0, "ping_timeout_s": 3600.0}


class Dashboard:
    """A page showing ``/dashboard`` of the gateway on ``port``, watched.

    ``confirm`` answers the page's confirmation dialogs (their texts are kept
    in ``dialogs``); ``check()`` asserts no console error and no request
    anywhere but the gateway.
    """

    def __init__(self, page: Any, port: int, shots: Path | None = None) -> None:
        self.page = page
        self.port = port
        self.shots = shots
        self.console_errors: list[str] = []
        self.urls: list[str] = []
        self.sockets: list[str] = []
        self.dialogs: list[str] = []
        self.confirm = False
        page.on("console", lambda msg: msg.type == "error" and self.console_errors.append(msg.text))
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("websocket", lambda ws: self.sockets.append(ws.url))
        page.on("dialog", self._dialog)

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        if self.confirm:
            await dialog.accept()
        else:
            await dialog.dismiss()

    async def open(self, query: str = "") -> None:
        await self.page.goto(f"http://127.0.0.1:{self.port}/dashboard{query}")

    def locator(self, selector: str) -> Any:
        return self.page.locator(selector)

    async def expect_text(self, selector: str, text: Any) -> None:
        from playwright.async_api import expect
        await expect(self.locator(selector)).to_have_text(text, timeout=TIMEOUT_MS)

    async def expect_count(self, selector: str, count: int) -> None:
        from playwright.async_api import expect
        await expect(self.locator(selector)).to_have_count(count, timeout=TIMEOUT_MS)

    async def expect_attribute(self, selector: str, name: str, value: Any) -> None:
        from playwright.async_api import expect
        await expect(self.locator(selector)).to_have_attribute(name, value, timeout=TIMEOUT_MS)

    async def connected(self) -> None:
        await self.expect_attribute("#state", "data-state", "connected")

    async def shot(self, name: str) -> None:
        if self.shots is not None:
            await self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    async def log_rows(self) -> list[dict[str, Any]]:
        """The log view's lines: offset, stream, text, shown (not filtered out)."""
        return await self.page.evaluate("""() => [...document.querySelectorAll('#log .line')].map((row) => ({
            offset: Number(row.dataset.offset), stream: row.dataset.stream,
            text: row.querySelector('.text').textContent, shown: !row.hidden,
            stderr: row.classList.contains('stderr')}))""")

    def check(self) -> None:
        assert not self.console_errors, self.console_errors
        origin = f"//127.0.0.1:{self.port}/"
        elsewhere = [url for url in self.urls + self.sockets
                     if not url.startswith(("http:" + origin, "ws:" + origin, "data:"))]
        assert not elsewhere, elsewhere


async def another_page(page: Any) -> Any:
    """A page in a context of its own (its own sessionStorage) of the same browser."""
    return await page.context.browser.new_page()


def token(**claims: Any) -> str:
    return mint_token(SECRET, ttl_s=3600, **claims)


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# -- served -------------------------------------------------------------------------


async def test_the_gateway_serves_the_page_its_script_and_styles_with_etags():
    async with running_gateway(ws_path="/socket") as gw:
        status, headers, page = await asyncio.to_thread(get, gw.port, "/dashboard")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert b'data-ws-path="/socket"' in page  # the page learns the configured path
        policy = headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert headers["Referrer-Policy"] == "no-referrer" and headers["X-Frame-Options"] == "DENY"
        assert "Access-Control-Allow-Origin" not in headers  # only the client is for other origins
        for path, kind in (("/dashboard/app.js", "text/javascript"), ("/dashboard/style.css", "text/css"),
                           ("/wirehub.js", "text/javascript")):
            status, headers, body = await asyncio.to_thread(get, gw.port, path)
            assert status == 200 and headers["Content-Type"].startswith(kind) and body
            assert headers["X-Content-Type-Options"] == "nosniff"
            status, again, empty = await asyncio.to_thread(get, gw.port, path, {"If-None-Match": headers["ETag"]})
            assert (status, empty, again["ETag"]) == (304, b"", headers["ETag"])
        assert (await asyncio.to_thread(get, gw.port, "/dashboard/"))[0] == 404
        # No HTML is ever built from data in the script.
        _, _, script = await asyncio.to_thread(get, gw.port, "/dashboard/app.js")
        assert not re.search(rb"innerHTML|outerHTML|insertAdjacentHTML|document\.write", script)


# -- metrics ------------------------------------------------------------------------


async def test_metrics_and_the_busiest_channels_appear_and_update(chromium, tmp_path):  # noqa: F811
    clock = ManualClock()
    gw = Gateway(Config(port=0, metrics_interval_s=2.0, **QUIET), clock=clock)
    async with running_gateway(gateway=gw), json_client(gw) as a, json_client(gw) as b, \
            json_client(gw) as c, browser_page(chromium) as page:
        for client in (a, b, c):
            await client.subscribe("prices.btc")
        await a.subscribe("news")
        board = Dashboard(page, gw.port, tmp_path)
        await board.open()
        await board.connected()
        connections = 'figure[data-field="connections"]'
        await board.expect_attribute(f"{connections} svg", "data-points", "1")   # the snapshot
        await board.expect_text(f"{connections} .value", "4")                     # 3 clients and the page
        await board.expect_text('#top-channels tr[data-channel="prices.btc"] td.num', "3")
        await board.expect_text('#top-channels tr:first-child td:first-child', "prices.btc")
        await board.expect_text('#top-channels tr[data-channel="news"] td.num', "1")

        for n in range(20):
            gw.publish("prices.btc", {"n": n})
        clock.advance(2.0)  # a metrics_update: 20 publications in 2 s, each delivered 3 times
        await board.expect_attribute(f"{connections} svg", "data-points", "2")
        await board.expect_text('figure[data-field="publications_per_s"] .value', "10")
        await board.expect_text('figure[data-field="deliveries_per_s"] .value', "30")
        await board.shot("metrics")

        await c.ws.close()
        await until(lambda: gw.metrics.connections_current == 3, what="the gateway saw the close")
        clock.advance(2.0)
        await board.expect_attribute(f"{connections} svg", "data-points", "3")
        await board.expect_text(f"{connections} .value", "3")
        await board.expect_text('figure[data-field="publications_per_s"] .value', "0")
        await board.expect_text('#top-channels tr[data-channel="prices.btc"] td.num', "2")
        line = await page.locator(f"{connections} polyline").get_attribute("points")
        assert len(line.split()) == 3
        board.check()


def test_top_channels_are_ten_at_most_and_merged_over_nodes():
    from wirehub.sources.metrics import TOP_CHANNELS, top_channels, total

    top = top_channels((f"c{i}", i % 13) for i in range(100))
    assert len(top) == TOP_CHANNELS == 10
    assert [e["subscribers"] for e in top] == [12] * 7 + [11] * 3
    assert top[0] == {"channel": "c12", "subscribers": 12}  # ties keep the channels' order
    a = {"node": "a/1", "connections": 1, "top_channels": [{"channel": "x", "subscribers": 5},
                                                           {"channel": "y", "subscribers": 4}]}
    b = {"node": "b/2", "connections": 2, "top_channels": [{"channel": "y", "subscribers": 3}]}
    assert total([a, b]) == {"connections": 3, "top_channels": [{"channel": "y", "subscribers": 7},
                                                                {"channel": "x", "subscribers": 5}]}


# -- login --------------------------------------------------------------------------


async def test_a_token_moves_from_the_address_to_session_storage_and_a_bad_one_is_refused(chromium, tmp_path):  # noqa: F811
    good = token(sub="ops-alice", permissions=["sys:metrics"], subscribe=["runners"])
    async with running_gateway(jwt_secret=SECRET, **QUIET) as gw, browser_page(chromium) as page:
        board = Dashboard(page, gw.port, tmp_path)
        await board.open(f"?view=1&token={good}")
        await board.connected()
        assert await page.evaluate("() => [location.search, sessionStorage.getItem('wirehub.dashboard.token')]") == \
            ["?view=1", good]
        assert "token" not in page.url
        await board.expect_text("#who", "logged in as ops-alice")
        await board.expect_attribute('figure[data-field="connections"] svg', "data-points", "1")
        await page.reload()  # the tab keeps the token
        await board.connected()
        await board.expect_text("#who", "logged in as ops-alice")
        assert "token" not in page.url
        await page.locator("#logout").click()
        await board.expect_text("#notice", "This gateway needs a token: paste one above.")
        assert await page.evaluate("() => sessionStorage.getItem('wirehub.dashboard.token')") is None
        board.check()

        refused = Dashboard(await another_page(page), gw.port, tmp_path)
        await refused.open("?token=not-a-token")
        await refused.expect_text("#notice", re.compile(r"^The gateway refused the token: "))
        await refused.expect_attribute("#state", "data-state", "closed")
        await refused.expect_attribute("#state", "data-code", "1008")
        await refused.expect_text("#state", re.compile(r"^closed \(close 1008 "))
        assert not await refused.page.locator("#login").is_hidden()
        assert await refused.page.evaluate("() => sessionStorage.getItem('wirehub.dashboard.token')") is None
        assert "token" not in refused.page.url
        await refused.shot("refused")
        # Pasting a good one.
        await refused.page.locator("#token-input").fill(good)
        await refused.page.locator("#login button").click()
        await refused.connected()
        await refused.expect_text("#who", "logged in as ops-alice")
        await refused.expect_attribute('figure[data-field="connections"] svg', "data-points", "1")
        assert await refused.page.locator("#notice").is_hidden()
        refused.check()

        anonymous = Dashboard(await another_page(page), gw.port, tmp_path)
        await anonymous.open()
        await anonymous.expect_text("#notice", "This gateway needs a token: paste one above.")
        await anonymous.expect_text("#metrics-status", re.compile("this gateway needs a token"))
        anonymous.check()


async def test_an_open_gateway_needs_no_token_and_says_a_token_grants_nothing(chromium):  # noqa: F811
    async with running_gateway(ws_path="/socket", **QUIET) as gw, browser_page(chromium) as page:
        board = Dashboard(page, gw.port)
        await board.open()
        await board.connected()
        await board.expect_attribute('figure[data-field="connections"] svg', "data-points", "1")
        assert await page.locator("#notice").is_hidden() and await page.locator("#who").is_hidden()
        await page.locator("#token-input").fill(token(sub="ops", permissions=["runners:delete"]))
        await page.locator("#login button").click()
        await board.expect_text("#notice", re.compile("^This gateway is open"))
        await board.connected()
        await board.expect_text("#who", "logged in as ops")  # not "(may stop and delete runners)"
        board.check()


# -- runners and logs, on channels the test writes ----------------------------------------


RUNNER = "3f2a8c0d1e4b5a697887a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5"


def runner(status: str = "running", name: str = "ci-runner-7") -> dict[str, Any]:
    return {"id": RUNNER, "name": name, "image": "runnerhub/runner:2.3", "status": status, "labels": {}}


def log_line(n: int) -> dict[str, Any]:
    text = f"line {n}"
    if n == 7:
        text += ' <img src=x onerror="window.pwned = 1"> <b>bold</b>'
    return {"ts": f"2026-11-26T17:44:{n % 60:02d}.000000000Z", "stream": "stderr" if n % 3 == 0 else "stdout",
            "line": text}


def number(text: str) -> int:
    return int(text.split()[1])


async def test_runners_and_a_live_log_end_to_end(chromium, tmp_path):  # noqa: F811
    calls: list[dict[str, Any]] = []
    gw = Gateway(Config(port=0, jwt_secret=SECRET, channels=KEEP_ALL, **LIMITS_OFF, **QUIET))

    # The Docker source's commands, as the gateway registers them (docs/docker.md).
    @gw.on("runner_stop", permission="runners:delete")
    def stop(conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
        calls.append(msg)
        return {"type": "runner_stopped", "runner": msg["runner"], "name": "ci-runner-7"}

    @gw.on("runner_delete", permission="runners:delete")
    def delete(conn: Any, msg: dict[str, Any]) -> dict[str, Any]:
        calls.append(msg)
        return {"type": "runner_deleted", "runner": msg["runner"], "name": "ci-runner-7"}

    claims = {"subscribe": ["runners", "logs:**"], "permissions": ["sys:metrics"]}
    operator = token(sub="ops-alice", **{**claims, "permissions": ["sys:metrics", "runners:delete"]})
    viewer = token(sub="viewer", **claims)
    channel = f"logs:{RUNNER}"
    async with running_gateway(gateway=gw), browser_page(chromium) as page:
        for n in range(1, 31):  # written before anyone looks: the tail comes from history
            gw.publish(channel, log_line(n))
        ops = Dashboard(page, gw.port, tmp_path)
        await ops.open(f"?token={operator}")
        await ops.connected()
        await until(lambda: gw.hub.viewers("runners") == 1, what="the page watching runners")
        gw.publish("runners", {"type": "initial_state", "runners": [runner(name="<b>ci-runner-7</b>")]})
        await ops.expect_count("#runners tr", 1)
        await ops.expect_text("#runners tr button.link", "<b>ci-runner-7</b>")  # text, not markup
        assert await page.locator("#runners b").count() == 0
        gw.publish("runners", {"type": "runner_update", "action": "started", "runner": runner()})
        await ops.expect_text("#runners tr button.link", "ci-runner-7")
        await ops.expect_text("#runners tr .status", "running")

        # The log: the tail, then live lines, in order; stderr marked.
        await page.locator("#runners tr button.link").click()
        await ops.expect_text("#log-title", "ci-runner-7")
        await ops.expect_count("#log .line", 30)
        for n in range(31, 41):
            gw.publish(channel, log_line(n))
        await ops.expect_count("#log .line", 40)
        rows = await ops.log_rows()
        assert [row["offset"] for row in rows] == list(range(1, 41))
        assert [number(row["text"]) for row in rows] == list(range(1, 41))
        assert [row["stderr"] for row in rows] == [n % 3 == 0 for n in range(1, 41)]
        assert {row["stream"] for row in rows if row["stderr"]} == {"stderr"}
        assert rows[6]["text"].endswith('<img src=x onerror="window.pwned = 1"> <b>bold</b>')
        assert await page.locator("#log img, #log b").count() == 0
        assert await page.evaluate("() => window.pwned") is None
        await ops.shot("log")

        # The filter, and the stream boxes.
        await page.locator("#log-filter").fill("LINE 1")
        await ops.expect_text("#log-count", "11 of 40 lines shown")  # 1, 10-19
        rows = await ops.log_rows()
        assert [number(r["text"]) for r in rows if r["shown"]] == [1, *range(10, 20)]
        await page.locator("#log-filter").fill("")
        await page.locator("#log-stdout").uncheck()
        await ops.expect_text("#log-count", "13 of 40 lines shown")
        assert all(r["stderr"] for r in await ops.log_rows() if r["shown"])
        await page.locator("#log-stdout").check()
        await ops.expect_text("#log-count", "40 lines")

        # Pause: lines wait, counted; follow: they are appended, in order.
        await page.locator("#log-pause").click()
        for n in range(41, 46):
            gw.publish(channel, log_line(n))
        await ops.expect_attribute("#log-pending", "data-count", "5")
        assert await page.locator("#log .line").count() == 40
        await ops.shot("log-paused")
        await page.locator("#log-follow").click()
        await ops.expect_count("#log .line", 45)
        await ops.expect_attribute("#log-pending", "data-count", "0")

        # Buttons: a click asks first; dismissed, nothing is sent.
        viewer_board = Dashboard(await another_page(page), gw.port, tmp_path)
        await viewer_board.open(f"?token={viewer}")
        await viewer_board.connected()
        await until(lambda: gw.hub.viewers("runners") == 2, what="the second page watching runners")
        gw.publish("runners", {"type": "runner_update", "action": "started", "runner": runner()})
        await viewer_board.expect_count("#runners tr", 1)
        await viewer_board.expect_text("#runners tr .status", "running")
        assert await viewer_board.page.locator("#runners button.stop, #runners button.delete").count() == 0
        await viewer_board.expect_text("#who", "logged in as viewer")
        await ops.expect_text("#who", "logged in as ops-alice (may stop and delete runners)")

        await page.locator("#runners button.stop").click()
        await until(lambda: len(ops.dialogs) == 1, what="a confirmation")
        assert ops.dialogs[0].startswith("Stop runner ci-runner-7?")
        ops.confirm = True
        await page.locator("#runners button.stop").click()
        await ops.expect_text("#runner-result", "ci-runner-7: stopped")
        await page.locator("#runners button.delete").click()
        await ops.expect_text("#runner-result", "ci-runner-7: deleted")
        assert ops.dialogs[2].startswith("Delete runner ci-runner-7?") and "killed first" in ops.dialogs[2]
        assert [(c["type"], c["runner"], c.get("force")) for c in calls] == \
            [("runner_stop", RUNNER, None), ("runner_delete", RUNNER, True)]

        # The gateway restarts every connection (1012); lines written meanwhile
        # arrive once, after the others.
        await page.evaluate("""() => {
            const state = document.getElementById('state');
            window.states = [];
            new MutationObserver(() => window.states.push(state.textContent))
                .observe(state, { childList: true, characterData: true, subtree: true });
        }""")
        for conn in list(gw.connections):
            conn.close(1012, "service restart")
        for n in range(46, 61):
            gw.publish(channel, log_line(n))
        gw.publish("runners", {"type": "runner_update", "action": "stopped", "runner": runner("exited")})
        await ops.expect_count("#log .line", 60)
        await ops.connected()
        await ops.expect_text("#runners tr .status", "exited")
        await viewer_board.expect_text("#runners tr .status", "exited")
        rows = await ops.log_rows()
        assert [row["offset"] for row in rows] == list(range(1, 61))
        assert [number(row["text"]) for row in rows] == list(range(1, 61))
        assert len(ops.sockets) == 2  # it did reconnect
        await ops.expect_text("#state", "connected")
        states = await page.evaluate("() => window.states")
        assert states[0] == "disconnected (close 1012 service restart), reconnecting…", states
        assert states[-1] == "connected", states
        await ops.shot("after-restart")
        ops.check()
        viewer_board.check()


# -- against a real Docker engine ----------------------------------------------------------


@pytest.fixture(scope="module")
def docker_host() -> Iterator[str]:
    from docker_engine import engine_host, stop_started_engine

    yield engine_host()
    stop_started_engine()


@pytest.fixture
def made(docker_host: str) -> Iterator[Any]:
    docker = pytest.importorskip("docker")
    from docker_engine import containers

    api = docker.APIClient(base_url=docker_host, version="auto")
    try:
        with containers(api, uuid.uuid4().hex[:12]) as made:
            yield made
    finally:
        api.close()


async def test_a_runner_started_during_the_test_its_log_and_a_stop_click(chromium, docker_host, made, tmp_path):  # noqa: F811
    from docker_engine import LABEL, wait_for

    from wirehub.sources.docker import DockerSources
    from wirehub.sources.docker_engine import Engine

    label = made.test_label
    api = made.api
    earlier = made.create("sleep 60", name=f"wh-{label}-earlier", start=False)  # listed by initial_state
    gw = Gateway(Config(port=0, jwt_secret=SECRET, **LIMITS_OFF, **QUIET))
    DockerSources(Engine(docker_host), runner_label=f"{LABEL}={label}").install(gw)
    operator = token(sub="ops-alice", subscribe=["runners", "logs:**"],
                     permissions=["sys:metrics", "runners:delete"])
    # 20 numbered lines, every 4th on stderr; then, once told, one every 10 ms.
    script = ('i=1; while [ $i -le 20 ]; do if [ $((i % 4)) -eq 0 ]; then echo "line $i" >&2; '
              f'else echo "line $i"; fi; i=$((i+1)); done; {wait_for()}; '
              'while true; do echo "line $i"; i=$((i+1)); sleep 0.01; done')
    async with running_gateway(gateway=gw), browser_page(chromium) as page:
        board = Dashboard(page, gw.port, tmp_path)
        await board.open(f"?token={operator}")
        await board.connected()
        await board.expect_text(f'#runners tr[data-runner-id="{earlier}"] button.link', f"wh-{label}-earlier")
        await board.expect_text(f'#runners tr[data-runner-id="{earlier}"] .status', "created")

        cid = await asyncio.to_thread(made.create, script, name=f"wh-{label}-job")
        row = f'#runners tr[data-runner-id="{cid}"]'
        await board.expect_text(f"{row} .status", "running")
        await page.locator(f"{row} button.link").click()
        await board.expect_count("#log .line", 20)
        rows = await board.log_rows()
        # The engine reads stdout and stderr from two pipes: it keeps each
        # stream's order, not their interleaving.
        assert sorted(number(r["text"]) for r in rows) == list(range(1, 21))
        for stderr in (False, True):
            ours = [number(r["text"]) for r in rows if r["stderr"] == stderr]
            assert ours == [n for n in range(1, 21) if (n % 4 == 0) == stderr]
            assert {r["stream"] for r in rows if r["stderr"] == stderr} == {"stderr" if stderr else "stdout"}
        await board.shot("docker-log")

        # Lines every 10 ms, and the gateway restarts the connection twice meanwhile.
        await asyncio.to_thread(made.signal, cid)
        for restart in range(2):
            await until(lambda n=restart + 1: len(board.sockets) == n, what="connected")
            await board.expect_count(f"#log .line >> nth={40 + 40 * restart}", 1)
            for conn in list(gw.connections):
                conn.close(1012, "service restart")
        await board.connected()
        await board.expect_count("#log .line >> nth=199", 1)
        rows = await board.log_rows()
        assert [number(r["text"]) for r in rows[20:]] == list(range(21, len(rows) + 1))
        offsets = [r["offset"] for r in rows]
        assert offsets == list(range(offsets[0], offsets[0] + len(rows)))

        board.confirm = True
        await page.locator(f"{row} button.stop").click()
        await board.expect_text("#runner-result", f"wh-{label}-job: stopped")
        await board.expect_text(f"{row} .status", "exited")
        assert not (await asyncio.to_thread(api.inspect_container, cid))["State"]["Running"]
        assert board.dialogs == [f"Stop runner wh-{label}-job?\n\nIt gets SIGTERM, then SIGKILL after 10 s."]
        await board.expect_count("#log .marker", 1)  # the stream_end
        await board.expect_text("#log .marker", re.compile(r"the log ended \(exited"))
        await board.shot("docker-stopped")
        board.check()
