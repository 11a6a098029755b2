// Shared by the Node tests of wirehub.js. tests/test_js_client.py runs each
// *.test.mjs file against a gateway it started, passing in the environment:
//   WIREHUB_JS   the wirehub.js file the package ships
//   WIREHUB_URL  the gateway's ws:// address (and scenario-specific values)
import assert from "node:assert/strict";
import { pathToFileURL } from "node:url";

export const wirehub = await import(pathToFileURL(process.env.WIREHUB_JS).href);
export const URL_ = process.env.WIREHUB_URL;
export const FAST = { reconnectIntervalMs: 20, maxReconnectIntervalMs: 200 };

/** The next `n` messages of a subscription, or fail after `timeoutMs`. */
export async function take(sub, n, timeoutMs = 20000) {
  const messages = [];
  const reading = (async () => {
    for await (const msg of sub) {
      messages.push(msg);
      if (messages.length === n) return messages;
    }
    return messages;
  })();
  const got = await within(reading, timeoutMs, `${n} messages on ${sub.channel} (got ${messages.length})`);
  assert.equal(got.length, n, `${sub.channel} ended after ${got.length} of ${n} messages`);
  return got;
}

/** Wait until `condition()` holds (checked on every turn of the event loop). */
export async function until(condition, what, timeoutMs = 20000) {
  const deadline = performance.now() + timeoutMs;
  while (!condition()) {
    if (performance.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

export function within(promise, timeoutMs, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), timeoutMs);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** 1, 2, ..., n */
export const range = (n) => Array.from({ length: n }, (_, i) => i + 1);
