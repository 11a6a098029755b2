// wirehub.js against a `wirehub serve` that tests/test_js_client.py kills
// with SIGKILL when this prints "kill" and starts again on the same port.
import assert from "node:assert/strict";
import test from "node:test";
import { FAST, URL_, take, until, wirehub } from "./harness.mjs";

test("a killed server comes back with a new epoch and the client carries on", { timeout: 60000 }, async () => {
  const client = new wirehub.Client(URL_, FAST);
  const gaps = [], states = [];
  client.on("gap", (gap) => gaps.push(gap));
  client.on("state", (state) => states.push(state));
  await client.start();
  const sub = await client.subscribe("c");
  await client.publish("c", "before");
  assert.deepEqual((await take(sub, 1)).map((m) => m.data), ["before"]);
  process.stdout.write("kill\n");
  await until(() => gaps.length > 0, "the gap reported", 30000);
  assert.equal(gaps[0].channel, "c");
  assert.equal(gaps[0].reason, "epoch_changed");
  assert.equal(client.state, "connected");
  await client.publish("c", "after");
  assert.deepEqual((await take(sub, 1)).map((m) => [m.offset, m.data]), [[1, "after"]]);
  assert.ok(states.includes("disconnected") && states.includes("connecting"));
  await client.close();
});
