// wirehub.js against an open gateway that keeps history, with the test's
// control messages (tests/test_js_client.py): ctl_feed publishes a paced
// feed and closes every connection with 1012 along the way, ctl_close_me
// closes the caller's connection, ctl_position reads a channel's position.
import assert from "node:assert/strict";
import test from "node:test";
import { FAST, URL_, range, take, until, wirehub } from "./harness.mjs";

const { Client, ClientClosed, ClientError, QueueFull, ServerError, Timeout, connect } = wirehub;

test("subscribe, publish JSON and bytes, request, waitFor", { timeout: 30000 }, async () => {
  const client = await connect(URL_, FAST);
  assert.equal(client.state, "connected");
  assert.ok(client.clientId);
  const sub = await client.subscribe("prices.btc");
  const position = await client.publish("prices.btc", { bid: 101.5 });
  assert.equal(position.offset, 1);
  assert.ok(position.epoch);
  const bytes = Uint8Array.of(0, 255, 1, 2);
  const binary = await client.publish("prices.btc", bytes);
  assert.deepEqual([binary.offset, binary.epoch], [2, position.epoch]);
  const [json, raw] = await take(sub, 2);
  assert.deepEqual(json, { channel: "prices.btc", offset: 1, data: { bid: 101.5 } });
  assert.equal(raw.offset, 2);
  assert.deepEqual(Array.from(raw.data), [0, 255, 1, 2]);
  const reply = await client.request({ type: "add", a: 2, b: 3 });
  assert.equal(reply.value, 5);
  assert.equal((await client.waitFor("sum", { timeoutMs: 1000 })).value, 5); // already received
  await assert.rejects(client.waitFor("sum", { timeoutMs: 50 }), Timeout);
  await client.close();
  assert.equal(client.state, "closed");
});

test("bad use gets clear errors, never a hang", { timeout: 30000 }, async () => {
  assert.throws(() => new Client("http//nowhere"), TypeError);
  const client = await connect(URL_, FAST);
  await client.subscribe("a");
  await assert.rejects(client.subscribe("a"), /already subscribed/);
  await assert.rejects(client.subscribe("a.*"), /is a pattern/);
  await assert.rejects(client.publish("a", 10n), /not JSON-serializable/);
  await assert.rejects(client.publish("a", undefined), TypeError);
  const refused = await client.publish("bad channel!", 1).catch((error) => error);
  assert.ok(refused instanceof ServerError);
  assert.equal(refused.code, "invalid_channel");
  await client.close();
  await assert.rejects(client.publish("a", 1), ClientClosed);
  await assert.rejects(client.subscribe("b"), ClientClosed);
  assert.ok(new ClientClosed("x") instanceof ClientError);
});

test("every offset once, in order, and queued publishes once, through ten 1012 restarts",
  { timeout: 120000 }, async () => {
    const total = 10000, own = 200;
    const client = await connect(URL_, FAST);
    const states = [];
    client.on("state", (state, code) => states.push([state, code]));
    const feed = await client.subscribe("feed");
    const mine = await client.subscribe("mine");
    // 5,000 publications/s on "feed", every connection closed with 1012 ten times along the way.
    const started = await client.request({ type: "ctl_feed", channel: "feed", total, rate: 5000, restarts: 10 });
    assert.equal(started.type, "feed_started");
    const offsets = [];
    for (let n = 0; n < own; n++) {
      offsets.push((await client.publish("mine", { n })).offset);
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
    const received = await take(feed, total, 60000);
    assert.deepEqual(received.map((m) => m.offset), range(total));
    assert.deepEqual(received.map((m) => m.data), range(total));
    const ownReceived = await take(mine, own, 60000);
    assert.deepEqual(ownReceived.map((m) => m.offset), range(own));
    assert.deepEqual(ownReceived.map((m) => m.data.n).sort((a, b) => a - b), range(own).map((n) => n - 1));
    assert.deepEqual([...offsets].sort((a, b) => a - b), range(own));
    const done = await client.request({ type: "ctl_feed_done" }, { timeoutMs: 60000 });
    assert.equal(done.restarts, 10);
    assert.equal(states.filter(([state, code]) => state === "disconnected" && code === 1012).length, 10);
    const position = await client.request({ type: "ctl_position", channel: "mine" });
    assert.equal(position.offset, own); // each publish applied once
    await client.close();
  });

test("publishes while disconnected are queued, bounded, and fail on close", { timeout: 30000 }, async () => {
  const client = await connect(URL_, { maxQueued: 3, reconnectIntervalMs: 60000, maxReconnectIntervalMs: 60000, random: () => 1 });
  client.request({ type: "ctl_close_me" }).catch(() => {}); // may lose its answer to the close
  await until(() => client.state === "disconnected", "the client disconnected");
  const queued = [1, 2, 3].map((n) => client.publish("q", n));
  await assert.rejects(client.publish("q", 4), QueueFull);
  await client.close();
  for (const publish of queued) await assert.rejects(publish, ClientClosed);
});

test("backoff is full jitter within the configured bounds and stops after max attempts", { timeout: 30000 }, async () => {
  const draws = [0.1, 0.9, 0.5, 0.999];
  const delays = [];
  let next = 0;
  const clock = { now: () => 0, sleep: (ms) => { delays.push(ms); return Promise.resolve(); } };
  const client = new Client(process.env.WIREHUB_DEAD_URL, {
    clock, random: () => draws[next++], maxReconnectAttempts: 4,
    reconnectIntervalMs: 1000, reconnectDecay: 1.5, maxReconnectIntervalMs: 2000,
  });
  await assert.rejects(client.start({ timeoutMs: 20000 }), /gave up after 4 reconnect attempts/);
  assert.equal(client.state, "closed");
  const ceilings = [1000, 1500, 2000, 2000]; // 1000 * 1.5^(attempt-1), capped at 2000
  assert.deepEqual(delays, draws.map((draw, i) => draw * ceilings[i]));
});

test("a source's snapshot at the subscribed offset is delivered, and again after a resume", { timeout: 30000 }, async () => {
  const client = await connect(URL_, FAST);
  await client.request({ type: "ctl_emit", channel: "state:a", n: 1 });
  await client.request({ type: "ctl_emit", channel: "state:a", n: 2 });
  const sub = await client.subscribe("state:a");
  assert.equal(sub.position.offset, 2);
  await client.request({ type: "ctl_emit", channel: "state:a", n: 3 });
  assert.deepEqual((await take(sub, 2)).map((m) => [m.offset, m.data]), [[2, { snapshot: 2 }], [3, { n: 3 }]]);
  const states = [];
  client.on("state", (state) => states.push(state));
  client.request({ type: "ctl_close_me" }).catch(() => {});
  // A source that keeps no history answers a resume afresh: its snapshot again, then what follows.
  assert.deepEqual((await take(sub, 1)).map((m) => [m.offset, m.data]), [[3, { snapshot: 3 }]]);
  assert.ok(states.includes("disconnected"));
  await client.request({ type: "ctl_emit", channel: "state:a", n: 4 });
  assert.deepEqual((await take(sub, 1)).map((m) => [m.offset, m.data]), [[4, { n: 4 }]]);
  await client.close();
});
