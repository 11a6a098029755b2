"""How many publications a page can take while it renders: ``wirehub.js``
in headless Chromium against a plain ``WebSocket`` doing the same, in the
same run.

The sender of ``bench/client_receive.py`` (a subprocess on its own core,
speaking just enough of the gateway's protocol) writes ``--messages``
publications of ``--size`` bytes as fast as it can. A ``wirehub serve``
beside it gives the page its origin and ``/wirehub.js`` (served with CORS,
so the page imports it, and opens its WebSocket to the sender).
The page takes each one (wirehub.js: ``sub.onMessage``; the baseline:
``JSON.parse`` of every frame), and a ``requestAnimationFrame`` loop renders
the count and the last 20 messages into the DOM every frame, as a live
dashboard would. Reported: messages per second until the page has them all,
and frames rendered meanwhile (medians of ``--repeat`` rounds, alternating).

Needs Playwright and Debian's chromium (``tests/browser/install-chromium.sh``).

    python bench/browser_receive.py                 # 200,000 x 64 B, 5 rounds
    python bench/browser_receive.py --messages 50000 --repeat 3

See docs/clients.md, "How fast".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
from pathlib import Path

from client_receive import SERVER
from playwright.async_api import async_playwright

ROOT = Path(__file__).resolve().parent.parent
PAGE = """
<pre id="count"></pre><ol id="last"></ol>
<script type="module">
const count = document.getElementById("count"), last = document.getElementById("last");
window.render = (state) => {
  // One DOM update per frame, whatever the message rate: what a page must do to keep up.
  const frame = () => {
    count.textContent = `${state.seen} messages`;
    last.replaceChildren(...state.recent.map((m) => Object.assign(document.createElement("li"), { textContent: m })));
    state.frames++;
    if (!state.done) requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
};
</script>
"""

WIREHUB_JS = """async ([url, channel, count, size]) => {
  const { connect } = await import(`${location.origin}/wirehub.js`);
  const client = await connect(url, { maxBuffered: count });
  const sub = await client.subscribe(channel);
  const state = { seen: 0, recent: [], frames: 0, done: false };
  let finish;
  const all = new Promise((resolve) => { finish = resolve; });
  sub.onMessage = (msg) => {
    state.seen++;
    if (state.recent.push(msg.offset) > 20) state.recent.shift();
    if (state.seen === count) finish();
  };
  render(state);
  const started = performance.now();
  await client.request({ type: "burst", channel, count, size }, { timeoutMs: 600000 });
  await all;
  const elapsed = (performance.now() - started) / 1000;
  state.done = true;
  await client.close();
  return [count / elapsed, state.frames / elapsed];
}"""

PLAIN_JS = """async ([url, channel, count, size]) => {
  const ws = new WebSocket(url);
  const state = { seen: 0, recent: [], frames: 0, done: false };
  let finish, started;
  const all = new Promise((resolve) => { finish = resolve; });
  const welcomed = new Promise((resolve) => {
    ws.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      if (msg.type === "welcome") return resolve();
      if (msg.type === "subscribed") {
        render(state);
        started = performance.now();
        ws.send(JSON.stringify({ type: "burst", channel, count, size, id: 2 }));
      } else if (msg.type === "message") {
        state.seen++;
        if (state.recent.push(msg.offset) > 20) state.recent.shift();
        if (state.seen === count) finish();
      }
    };
  });
  await welcomed;
  ws.send(JSON.stringify({ type: "subscribe", channel, id: 1 }));
  await all;
  const elapsed = (performance.now() - started) / 1000;
  state.done = true;
  ws.close();
  return [count / elapsed, state.frames / elapsed];
}"""


def chromium() -> str:
    result = subprocess.run(["bash", str(ROOT / "tests" / "browser" / "install-chromium.sh")],
                            check=True, capture_output=True, text=True)
    return result.stdout.strip()


async def measure(opts: argparse.Namespace, port: int, origin: str) -> dict[str, list[tuple[float, float]]]:
    url = f"ws://127.0.0.1:{port}/ws"
    runs: dict[str, list[tuple[float, float]]] = {"wirehub.js": [], "WebSocket": []}
    scripts = {"wirehub.js": WIREHUB_JS, "WebSocket": PLAIN_JS}
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = await browser.new_page()
        await page.goto(f"{origin}/healthz")  # a gateway's origin: /wirehub.js is there
        await page.set_content(PAGE)
        await page.wait_for_function("typeof window.render === 'function'")
        for r in range(opts.repeat):
            order = list(scripts) if r % 2 == 0 else list(reversed(scripts))
            for name in order:
                rate, fps = await page.evaluate(scripts[name], [url, f"bench.{name}.{r}", opts.messages, opts.size])
                runs[name].append((rate, fps))
                print(f"round {r + 1}/{opts.repeat} {name}: {rate:,.0f} messages/s, {fps:.0f} frames/s",
                      file=sys.stderr, flush=True)
        await browser.close()
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 3)[3],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000, help="publications per burst (default 200,000)")
    parser.add_argument("--size", type=int, default=64, help="payload bytes (default 64)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    opts = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    port, http_port = 20000 + os.getpid() % 20000, 40000 + os.getpid() % 20000
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True,
                              preexec_fn=(lambda: os.sched_setaffinity(0, {cores[-1]})) if len(cores) > 1 else None)
    origin = subprocess.Popen([sys.executable, "-m", "wirehub", "serve", "--port", str(http_port)],
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        assert origin.stderr is not None and "listening on" in origin.stderr.readline()
        runs = asyncio.run(measure(opts, port, f"http://127.0.0.1:{http_port}"))
    finally:
        for process in (server, origin):
            process.kill()
            process.wait()
    print(f"{opts.messages:,} x {opts.size} B into one page, rendering every animation frame; "
          f"medians of {opts.repeat} rounds:")
    for name, rounds in runs.items():
        print(f"{name:<12} {statistics.median(r for r, _ in rounds):>12,.0f} messages/s "
              f"{statistics.median(f for _, f in rounds):>6.0f} frames/s")
    ratio = statistics.median(w[0] / p[0] for w, p in zip(runs["wirehub.js"], runs["WebSocket"]))
    print(f"wirehub.js / plain WebSocket: {ratio:.2f}x (median of the rounds' ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
