// wirehub.js against a gateway that needs tokens and runs on a ManualClock
// (tests/test_js_client.py): ctl_advance moves the gateway's clock.
// WIREHUB_TOKENS: tokens for "alice" (subscribe "a"), the second minted 570 s
// after the first, both valid for 600 s.
import assert from "node:assert/strict";
import test from "node:test";
import { FAST, URL_, wirehub } from "./harness.mjs";

const { Client, ClientClosed, connect } = wirehub;
const TOKENS = process.env.WIREHUB_TOKENS.split(",");

test("a refused token is terminal", { timeout: 30000 }, async () => {
  const client = new Client(URL_, { token: "not-a-token", ...FAST });
  const states = [];
  client.on("state", (state, code) => states.push([state, code]));
  await assert.rejects(client.start(), (error) => error instanceof ClientClosed && /1008/.test(error.message));
  assert.equal(client.state, "closed");
  assert.equal(client.closeCode, 1008);
  assert.equal(states.filter(([state]) => state === "connecting").length, 1); // never retried
});

test("the token is refreshed on token_expiring with one getToken call", { timeout: 30000 }, async () => {
  let calls = 0;
  const getToken = async () => TOKENS[calls++];
  const client = await connect(URL_, { getToken, ...FAST });
  assert.equal(calls, 1); // before connecting
  await client.subscribe("a");
  const first = await client.waitFor("authenticated");
  await client.request({ type: "ctl_advance", s: 600 - 30 });
  const refreshed = await client.waitFor("authenticated", { predicate: (m) => m.exp > first.exp });
  assert.equal(refreshed.sub, "alice");
  assert.equal(calls, 2);
  await client.request({ type: "ctl_advance", s: 60 }); // past the first token's exp: still open
  assert.equal((await client.request({ type: "ping" })).type, "pong");
  assert.equal(client.state, "connected");
  await client.close();
});
