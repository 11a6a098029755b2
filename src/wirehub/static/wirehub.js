// wirehub.js: the wirehub client for browsers and Node >= 22 (global WebSocket).
//
// One ES module, no dependencies, no build step. The gateway serves it at
// /wirehub.js. It has the semantics of the Python client (wirehub.Client,
// docs/clients.md):
//
//   import { connect } from "/wirehub.js";
//   const client = await connect("ws://127.0.0.1:8080/ws", { token, getToken });
//   const sub = await client.subscribe("prices.btc");
//   const pos = await client.publish("prices.btc", { bid: 101.5 });  // {offset, epoch}
//   for await (const msg of sub) { msg.channel, msg.offset, msg.data }
//
// * Reconnects with exponential backoff and full jitter; stops on a refused
//   token and on close codes that say retrying cannot help.
// * Resumes every subscription with `since` = the last offset it received, so
//   the application sees every offset once and in order; what the server
//   cannot give back arrives as a Gap (`sub.onGap`, the "gap" event).
// * Queues publishes made while disconnected (bounded) and sends them once
//   resubscribed; each carries an idempotency_key, so a retry is never doubled.
// * Refreshes the token through `getToken` on token_expiring and before each
//   reconnect; concurrent needs share one call.
//
// The token is sent in an `auth` message, the first thing on each connection:
// browsers cannot set an Authorization header, and a refused handshake is
// invisible to a WebSocket object (close 1006), while a refused `auth` closes
// with 1008 and a reason the client can act on.

export const CONNECTING = "connecting";
export const CONNECTED = "connected";
export const DISCONNECTED = "disconnected";
export const CLOSED = "closed";

// The server closed for a reason reconnecting cannot fix: the client's own
// protocol errors and unsupported data (RFC 6455 section 7.4.1).
const TERMINAL_CLOSE_CODES = new Set([1002, 1003, 1007, 1009, 1010]);
const POLICY_VIOLATION = 1008;
const RECENT_MESSAGES = 1000; // kept for waitFor to look at first

export class ClientError extends Error {
  constructor(message) { super(message); this.name = new.target.name; }
}
/** Closed by the application, or for good after a failure retrying cannot fix. */
export class ClientClosed extends ClientError {}
/** A publish while disconnected found the offline queue full. */
export class QueueFull extends ClientError {}
/** A request was sent and the connection dropped before its answer: it may have run. */
export class ConnectionLost extends ClientError {}
/** No answer (or no matching message) within the timeout. */
export class Timeout extends ClientError {}
/** The server answered `error`: `code` is the protocol's error code (docs/protocol.md). */
export class ServerError extends ClientError {
  constructor(code, message) { super(`${code}: ${message}`); this.code = code; }
}

/** Publications of `channel` the application will not see (offsets `first` to `last` when known). */
export class Gap {
  constructor(channel, reason, first = null, last = null) {
    Object.assign(this, { channel, reason, first, last });
  }
}

// -- TLV, the binary codec (docs/protocol.md, "Binary messages") ------------------

const STR = 0, BYTES = 1, U64 = 2, BOOL = 3, F64 = 4, NESTED = 5;
const FIELDS = [
  [0x01, "type", STR], [0x02, "channel", STR], [0x03, "data", BYTES], [0x04, "id", STR],
  [0x05, "offset", U64], [0x06, "exclude_self", BOOL], [0x07, "code", STR], [0x08, "error", STR],
  [0x09, "client_id", STR], [0x0a, "server", STR], [0x10, "token", STR], [0x11, "sub", STR],
  [0x12, "exp", U64], [0x13, "reason", STR], [0x20, "tail", U64], [0x30, "epoch", STR],
  [0x31, "since_offset", U64], [0x32, "since_epoch", STR], [0x33, "recovered", BOOL],
  [0x34, "from", U64], [0x35, "to", U64], [0x36, "dropped", U64], [0x37, "limit", U64],
  [0x38, "reverse", BOOL], [0x39, "max_rate", F64], [0x3a, "key", STR], [0x3b, "publication", NESTED],
  [0x3c, "more", BOOL], [0x3d, "binary", BOOL], [0x3e, "idempotency_key", STR], [0x3f, "duplicate", BOOL],
];
const BY_TAG = new Map(FIELDS.map(([tag, name, kind]) => [tag, [name, kind]]));
const BY_NAME = new Map(FIELDS.map(([tag, name, kind]) => [name, [tag, kind]]));
const utf8 = new TextEncoder();
const utf8Strict = new TextDecoder("utf-8", { fatal: true });

export const tlv = {
  /** Records of `message`'s known fields; `data` is bytes (a Uint8Array or ArrayBuffer). */
  encode(message) {
    const parts = [];
    let size = 0;
    for (const [name, value] of Object.entries(message)) {
      const field = BY_NAME.get(name);
      if (field === undefined || value === undefined || value === null) continue;
      const [tag, kind] = field;
      let bytes;
      if (kind === STR) bytes = utf8.encode(String(value));
      else if (kind === BYTES) bytes = asBytes(value);
      else if (kind === BOOL) bytes = Uint8Array.of(value ? 1 : 0);
      else if (kind === U64 || kind === F64) {
        bytes = new Uint8Array(8);
        const view = new DataView(bytes.buffer);
        if (kind === U64) view.setBigUint64(0, BigInt(value)); else view.setFloat64(0, value);
      } else throw new TypeError(`${name} cannot be sent as TLV`);
      parts.push(tag, bytes);
      size += 5 + bytes.length;
    }
    const out = new Uint8Array(size);
    const view = new DataView(out.buffer);
    let at = 0;
    for (let i = 0; i < parts.length; i += 2) {
      const bytes = parts[i + 1];
      out[at] = parts[i];
      view.setUint32(at + 1, bytes.length);
      out.set(bytes, at + 5);
      at += 5 + bytes.length;
    }
    return out;
  },

  /** A message object from TLV records; repeated `publication`s become `publications`. */
  decode(buffer) {
    const bytes = asBytes(buffer);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const message = {};
    let at = 0;
    while (at < bytes.length) {
      if (at + 5 > bytes.length) throw new TypeError("truncated TLV record header");
      const tag = bytes[at];
      const length = view.getUint32(at + 1);
      const start = at + 5;
      at = start + length;
      if (at > bytes.length) throw new TypeError("truncated TLV record");
      const field = BY_TAG.get(tag);
      if (field === undefined) continue; // a newer server's field
      const [name, kind] = field;
      const value = bytes.subarray(start, at);
      if (kind === STR) message[name] = utf8Strict.decode(value);
      else if (kind === BYTES) message[name] = value;
      else if (kind === BOOL) message[name] = value[0] === 1;
      else if (kind === U64) message[name] = Number(view.getBigUint64(start));
      else if (kind === F64) message[name] = view.getFloat64(start);
      else (message.publications ??= []).push(tlv.decode(value));
    }
    return message;
  },
};

function asBytes(value) {
  if (value instanceof Uint8Array) return value;
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  throw new TypeError("binary data must be an ArrayBuffer or a typed array");
}

function isBinary(value) {
  return value instanceof ArrayBuffer || ArrayBuffer.isView(value);
}

function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // also in insecure contexts, unlike randomUUID
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** A FIFO with O(1) shift (Array.prototype.shift moves every element). */
class Queue {
  constructor() { this.items = []; this.head = 0; }
  get length() { return this.items.length - this.head; }
  push(item) { this.items.push(item); }
  unshift(item) {
    if (this.head > 0) this.items[--this.head] = item; else this.items.unshift(item);
  }
  shift() {
    const item = this.items[this.head];
    this.items[this.head++] = undefined;
    if (this.head > 1024 && this.head * 2 > this.items.length) { this.items = this.items.slice(this.head); this.head = 0; }
    return item;
  }
  clear() { this.items = []; this.head = 0; }
  *[Symbol.iterator]() { for (let i = this.head; i < this.items.length; i++) yield this.items[i]; }
}

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  promise.catch(() => {}); // an answer nobody awaits any more must not be an unhandled rejection
  return { promise, resolve, reject, done: false };
}

function settle(waiter, error, value) {
  if (waiter === null || waiter.done) return;
  waiter.done = true;
  if (error) waiter.reject(error); else waiter.resolve(value);
}

/** Real time; tests pass their own `{ now(), sleep(ms, signal) }`. */
export const realClock = {
  now: () => performance.now(),
  /** Resolves after `ms`, or at once when `signal` aborts (a closed client keeps no timer alive). */
  sleep: (ms, signal) => new Promise((resolve) => {
    const abort = () => { clearTimeout(timer); resolve(); };
    const timer = setTimeout(() => { signal?.removeEventListener("abort", abort); resolve(); }, ms);
    signal?.addEventListener("abort", abort, { once: true });
  }),
};

// -- subscriptions ----------------------------------------------------------------

/**
 * One channel's publications in offset order: `for await (const msg of sub)`,
 * or `sub.onMessage = (msg) => ...` to take them as they arrive.
 *
 * Iterated, the buffer holds at most `maxBuffered` messages; past it the client
 * stops buffering and, once the application has caught up, resumes the
 * channel from history (`since`): a slow page costs the server history reads,
 * not the tab unbounded memory.
 */
export class Subscription {
  constructor(client, channel, maxRate, maxBuffered) {
    this.channel = channel;
    this.maxRate = maxRate;
    this.onGap = null;
    this.onMessage = null;
    this.position = null; // {offset, epoch} of the last publication received: where a resume starts
    // Offsets up to this one are repeats. A fresh subscription starts one below
    // its `subscribed` position, since a source's snapshot comes at that offset
    // (`initial_state` on `runners`, docs/docker.md).
    this._last = -1;
    this._client = client;
    this._buffer = new Queue();
    this._maxBuffered = maxBuffered;
    this._behind = false;
    this._wake = null;
    this._ended = false;
    this._ready = null;
  }

  [Symbol.asyncIterator]() { return this; }

  async next() {
    while (this._buffer.length === 0) {
      if (this._ended) return { value: undefined, done: true };
      if (this._behind) {
        this._behind = false;
        this._client._resume(this);
      }
      await new Promise((resolve) => { this._wake = resolve; });
    }
    return { value: this._buffer.shift(), done: false };
  }

  /** Stop the subscription; iteration ends once the buffer is read. */
  unsubscribe() { return this._client._unsubscribe(this); }

  _offer(offset, data) {
    if (offset <= this._last) return; // sent again by a resume
    const message = { channel: this.channel, offset, data };
    if (this.onMessage === null && (this._behind || this._buffer.length >= this._maxBuffered)) {
      this._behind = true;
      return;
    }
    this._last = offset;
    const position = this.position;
    this.position = { offset: Math.max(offset, position?.offset ?? 0), epoch: position?.epoch ?? "" };
    if (this.onMessage !== null) {
      this._client._call(this.onMessage, message);
      return;
    }
    this._buffer.push(message);
    this._signal();
  }

  /** Resume (or start) after `position`: what comes at or before it is a repeat. */
  _setPosition(position, fresh = false) {
    this.position = position;
    this._last = fresh ? position.offset - 1 : position.offset;
  }

  _gap(gap) {
    if (this.onGap !== null) this._client._call(this.onGap, gap);
    this._client._emit("gap", gap);
  }

  _end() {
    this._ended = true;
    this._signal();
  }

  _signal() {
    const wake = this._wake;
    this._wake = null;
    if (wake !== null) wake();
  }
}

const PUBLISH = "publish", SUBSCRIBE = "subscribe", REQUEST = "request", CONTROL = "control";

// -- the client -------------------------------------------------------------------

/**
 * A wirehub connection that outlives its sockets. Use `connect()`.
 *
 * Options: token, getToken (() => string | Promise<string>), reconnectIntervalMs
 * (1000), maxReconnectIntervalMs (30000), reconnectDecay (1.5),
 * maxReconnectAttempts (null: for ever), maxQueued (1000), maxQueuedBytes
 * (1 MiB), maxBuffered (10000), connectTimeoutMs (10000), and for tests and
 * other runtimes: clock ({now, sleep}), random (() => [0, 1)), WebSocket.
 */
export class Client {
  constructor(url, options = {}) {
    const scheme = URL.canParse(url) ? new URL(url).protocol : null;
    if (!["ws:", "wss:", "http:", "https:"].includes(scheme)) throw new TypeError(`not a ws:// or wss:// URL: ${url}`);
    this.url = url;
    this.state = DISCONNECTED;
    this.closeCode = null;
    this.closeReason = "";
    this.clientId = null;
    this.reconnectIntervalMs = options.reconnectIntervalMs ?? 1000;
    this.maxReconnectIntervalMs = options.maxReconnectIntervalMs ?? 30000;
    this.reconnectDecay = options.reconnectDecay ?? 1.5;
    this.maxReconnectAttempts = options.maxReconnectAttempts ?? null;
    this.maxQueued = options.maxQueued ?? 1000;
    this.maxQueuedBytes = options.maxQueuedBytes ?? 1 << 20;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10000;
    this._maxBuffered = options.maxBuffered ?? 10000;
    this._token = options.token ?? null;
    this._getToken = options.getToken ?? null;
    this._tokenCall = null;
    this._clock = options.clock ?? realClock;
    this._random = options.random ?? Math.random;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new ClientError("no WebSocket implementation: Node needs version 22 (or --experimental-websocket), "
        + "or pass { WebSocket } from a library");
    }
    this._listeners = new Map();
    this._subscriptions = new Map();
    this._outbox = new Queue(); // not sent yet
    this._outboxBytes = 0;
    this._inFlight = new Map(); // String(id) -> outgoing, sent and unanswered
    this._nextId = 0;
    this._recent = [];
    this._waiters = new Set();
    this._socket = null;
    this._running = null;
    this._connected = deferred();
    this._closed = new AbortController(); // aborted when the application (or a terminal error) closes
    this._everConnected = false;
    this._error = null;
  }

  // -- lifecycle ------------------------------------------------------------------

  /** Start connecting; resolve once connected the first time (ClientClosed if that fails for good). */
  async start({ timeoutMs = 10000 } = {}) {
    if (this._running !== null) throw new ClientError("start() was called already");
    this._running = this._run();
    let timer;
    const timeout = new Promise((resolve) => { timer = setTimeout(resolve, timeoutMs); });
    await Promise.race([this._connected.promise, this._running, timeout]);
    clearTimeout(timer);
    if (!this._everConnected) {
      const why = this._error?.message ?? "timed out";
      await this.close();
      throw new ClientClosed(`could not connect to ${this.url}: ${why}`);
    }
  }

  /** Close; subscriptions end and everything waiting fails with ClientClosed. */
  async close() {
    if (this.state === CLOSED) return;
    this._finish(new ClientClosed("the client was closed"));
    this._socket?.close(1000);
    await this._running;
  }

  /**
   * "state": (state, code, reason) on every change; "gap": (Gap);
   * "message": (msg) for every server message but publications.
   * Returns a function that removes the callback.
   */
  on(event, callback) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(callback);
    return () => this._listeners.get(event).delete(callback);
  }

  // -- the application's calls ----------------------------------------------------

  /** Subscribe (resumed by every reconnect); resolves to the Subscription. */
  async subscribe(channel, { maxRate = null } = {}) {
    this._checkOpen();
    if (this._subscriptions.has(channel)) throw new ClientError(`already subscribed to ${channel}: use that Subscription`);
    if (channel.includes("*")) throw new ClientError(`${channel} is a pattern: this client subscribes to channels (a pattern has no offsets to resume from)`);
    const sub = new Subscription(this, channel, maxRate, this._maxBuffered);
    this._subscriptions.set(channel, sub);
    sub._ready = deferred();
    if (this.state === CONNECTED) this._sendNow({ msg: this._subscribeMessage(sub), kind: SUBSCRIBE, answer: sub._ready });
    try {
      await sub._ready.promise;
    } catch (error) {
      if (this._subscriptions.get(channel) === sub) this._subscriptions.delete(channel);
      throw error;
    }
    return sub;
  }

  /**
   * Publish `data`: any JSON value, or bytes (ArrayBuffer, typed array), sent
   * as a binary (TLV) publish that subscribers receive byte for byte. Resolves
   * to {offset, epoch, duplicate} once the server has it; queued while offline.
   */
  async publish(channel, data, { key = null } = {}) {
    const msg = { type: "publish", channel, idempotency_key: randomKey() };
    if (key !== null) msg.key = key;
    if (isBinary(data)) msg.data = asBytes(data).slice(); // the caller may reuse its buffer
    else if (data === undefined) throw new TypeError("publish needs data (undefined is not JSON)");
    else msg.data = data;
    const reply = await this._send(msg, PUBLISH);
    return { offset: reply.offset, epoch: reply.epoch ?? "", duplicate: reply.duplicate === true };
  }

  /** Send an application message (Gateway.on) and resolve to the server's answer, matched by id. */
  async request(message, { timeoutMs = 10000 } = {}) {
    if (typeof message?.type !== "string") throw new TypeError("a message needs a string `type`");
    return this._withTimeout(this._send({ ...message }, REQUEST), timeoutMs, `no answer to ${message.type}`);
  }

  /** The next server message of `type` (that `predicate` accepts), looking first at the last ones received. */
  async waitFor(type, { timeoutMs = 5000, predicate = null } = {}) {
    const index = this._recent.findIndex((m) => m.type === type && (predicate === null || predicate(m)));
    if (index >= 0) return this._recent.splice(index, 1)[0];
    const waiter = { type, predicate, answer: deferred() };
    this._waiters.add(waiter);
    try {
      return await this._withTimeout(waiter.answer.promise, timeoutMs, `no ${type} message`);
    } finally {
      this._waiters.delete(waiter);
    }
  }

  /** The delay before reconnect `attempt` (1, 2, ...): full jitter. */
  backoffMs(attempt) {
    const ceiling = Math.min(this.maxReconnectIntervalMs, this.reconnectIntervalMs * this.reconnectDecay ** (attempt - 1));
    return this._random() * ceiling;
  }

  // -- the connection loop --------------------------------------------------------

  async _run() {
    let attempt = 0;
    while (this.state !== CLOSED) {
      this._setState(CONNECTING);
      let connectedAt = null, code = null, reason = "";
      try {
        ({ connectedAt, code, reason } = await this._connectOnce());
      } catch (error) {
        this._error = error;
        reason = error.message;
      }
      if (this.state === CLOSED) return;
      if (connectedAt !== null && this._clock.now() - connectedAt >= this.maxReconnectIntervalMs) attempt = 0;
      if (TERMINAL_CLOSE_CODES.has(code) || (code === POLICY_VIOLATION && !this._canRefresh(reason))) {
        this._error = new ClientClosed(`closed by the server: ${code} ${reason}`);
        this._finish(this._error, code, reason);
        return;
      }
      this._setState(DISCONNECTED, code, reason);
      attempt += 1;
      if (this.maxReconnectAttempts !== null && attempt > this.maxReconnectAttempts) {
        this._error = new ClientClosed(`gave up after ${attempt - 1} reconnect attempts: ${reason}`);
        this._finish(this._error, code, reason);
        return;
      }
      await this._clock.sleep(this.backoffMs(attempt), this._closed.signal);
    }
  }

  /** One connection, from the upgrade to its close: {connectedAt, code, reason}. */
  async _connectOnce() {
    if (this._getToken !== null) this._token = await this._freshToken();
    if (this.state === CLOSED) return { connectedAt: null, code: null, reason: "" };
    const socket = new this._WebSocket(this.url);
    socket.binaryType = "arraybuffer";
    this._socket = socket;
    let connectedAt = null;
    const timer = setTimeout(() => { if (connectedAt === null) socket.close(); }, this.connectTimeoutMs);
    try {
      return await new Promise((resolve) => {
        socket.onmessage = (event) => {
          let msg;
          try {
            msg = typeof event.data === "string" ? JSON.parse(event.data) : tlv.decode(event.data);
          } catch {
            this._emit("error", new ClientError("undecodable message from the server"));
            return;
          }
          if (connectedAt !== null) this._dispatch(msg);
          else if (msg.type === "welcome") {
            connectedAt = this._clock.now();
            this.clientId = msg.client_id ?? null;
            this._onConnected();
          }
        };
        socket.onclose = (event) => resolve({
          connectedAt,
          code: event.code,
          reason: event.reason || (connectedAt === null ? "could not connect" : ""),
        });
        // A failed upgrade: some runtimes (Node 20's undici) fire no close after it.
        socket.onerror = () => {
          if (socket.readyState !== 0) return; // an open socket's close event follows
          resolve({ connectedAt, code: 1006, reason: "could not connect" });
        };
      });
    } finally {
      clearTimeout(timer);
      socket.onmessage = socket.onclose = socket.onerror = null;
      this._socket = null;
      if (connectedAt !== null) {
        this._connected = deferred();
        this._onDisconnected();
      }
    }
  }

  /** Authenticate, resubscribe, then send what waited, in order: each
   * subscription resumes before a queued publish can reach it. */
  _onConnected() {
    if (this._token !== null) this._sendNow({ msg: { type: "auth", token: this._token }, kind: CONTROL, answer: null });
    for (const sub of this._subscriptions.values()) {
      const answer = sub._ready !== null && !sub._ready.done ? sub._ready : null;
      this._sendNow({ msg: this._subscribeMessage(sub), kind: SUBSCRIBE, answer });
    }
    while (this._outbox.length > 0) {
      const out = this._outbox.shift();
      this._outboxBytes -= out.size;
      this._sendNow(out);
    }
    this._setState(CONNECTED);
    if (this._token === null) this._authenticated();
    // else: once the server accepts the token (a refused one closes with 1008)
  }

  _authenticated() {
    this._everConnected = true;
    settle(this._connected, null, undefined);
  }

  /** Publishes in flight go back to the front of the queue, in order;
   * requests in flight fail; subscribes are redone by the next connection. */
  _onDisconnected() {
    const again = [];
    for (const out of this._inFlight.values()) {
      if (out.answer === null || out.answer.done) continue;
      if (out.kind === PUBLISH) again.push(out);
      else if (out.kind === REQUEST) settle(out.answer, new ConnectionLost("the connection dropped before the answer"));
    }
    this._inFlight.clear();
    for (const out of again.reverse()) {
      this._outbox.unshift(out);
      this._outboxBytes += out.size;
    }
  }

  // -- sending --------------------------------------------------------------------

  /** Send now, or queue until connected (bounded); resolve to the answer. */
  _send(msg, kind) {
    this._checkOpen();
    const out = { msg, kind, answer: deferred(), size: 0 };
    if (this.state === CONNECTED) {
      this._sendNow(out);
    } else {
      out.size = this._encode(msg).length;
      if (this._outbox.length >= this.maxQueued || this._outboxBytes + out.size > this.maxQueuedBytes) {
        throw new QueueFull(`offline queue full (${this._outbox.length} messages, ${this._outboxBytes} bytes)`);
      }
      this._outbox.push(out);
      this._outboxBytes += out.size;
    }
    return out.answer.promise;
  }

  /** Give `out` the next id, remember it until answered (if it waits for one), send it. */
  _sendNow(out) {
    this._nextId += 1;
    out.msg.id = this._nextId;
    if (out.answer !== null || out.kind === SUBSCRIBE) this._inFlight.set(String(this._nextId), out);
    this._socket.send(this._encode(out.msg));
  }

  _encode(msg) {
    if (isBinary(msg.data)) return tlv.encode(msg);
    try {
      return JSON.stringify(msg);
    } catch (error) {
      throw new TypeError(`not JSON-serializable: ${error.message}`);
    }
  }

  _subscribeMessage(sub) {
    const msg = { type: "subscribe", channel: sub.channel };
    if (sub.position !== null && sub.position.epoch) msg.since = { offset: sub.position.offset, epoch: sub.position.epoch };
    if (sub.maxRate !== null) msg.max_rate = sub.maxRate;
    return msg;
  }

  /** A subscription that stopped buffering has caught up: resubscribe from where it is. */
  _resume(sub) {
    if (this.state !== CONNECTED) return; // the next connection resubscribes it anyway
    this._socket.send(JSON.stringify({ type: "unsubscribe", channel: sub.channel }));
    this._sendNow({ msg: this._subscribeMessage(sub), kind: SUBSCRIBE, answer: null });
  }

  async _unsubscribe(sub) {
    if (this._subscriptions.get(sub.channel) !== sub) return;
    this._subscriptions.delete(sub.channel);
    sub._end();
    if (this.state === CONNECTED) this._sendNow({ msg: { type: "unsubscribe", channel: sub.channel }, kind: CONTROL, answer: null });
  }

  // -- receiving ------------------------------------------------------------------

  _dispatch(msg) {
    const type = msg.type;
    if (type === "message") {
      this._subscriptions.get(msg.channel)?._offer(msg.offset, msg.data);
      return;
    }
    if (type === "subscribed") this._subscribed(msg);
    else if (type === "lagged") {
      const sub = this._subscriptions.get(msg.channel);
      sub?._gap(new Gap(sub.channel, "lagged", msg.from ?? null, msg.to ?? null));
    } else if (type === "unsubscribed" && msg.reason) {
      const sub = this._subscriptions.get(msg.channel);
      if (sub !== undefined) {
        this._subscriptions.delete(msg.channel);
        sub._end();
      }
    } else if (type === "authenticated" || (type === "auth_error" && msg.code === "auth_not_configured")) {
      this._authenticated(); // (an open gateway refuses tokens and stays open)
    } else if (type === "token_expiring" && this._getToken !== null) {
      this._refreshInPlace();
    }
    const out = msg.id !== undefined ? this._inFlight.get(String(msg.id)) : undefined;
    if (out !== undefined) {
      this._inFlight.delete(String(msg.id));
      this._answered(out, msg);
    }
    this._recent.push(msg);
    if (this._recent.length > RECENT_MESSAGES) this._recent.shift();
    for (const waiter of this._waiters) {
      if (waiter.type === type && !waiter.answer.done && (waiter.predicate === null || waiter.predicate(msg))) {
        settle(waiter.answer, null, msg);
        this._recent.pop();
        break;
      }
    }
    this._emit("message", msg);
  }

  _answered(out, msg) {
    if (msg.type === "error") {
      const error = new ServerError(msg.code ?? "?", msg.error ?? "");
      if (out.kind === SUBSCRIBE && out.answer === null) {
        // A resubscription refused (a refreshed token no longer covers it): end it.
        const sub = this._subscriptions.get(out.msg.channel);
        if (sub !== undefined) {
          this._subscriptions.delete(out.msg.channel);
          sub._end();
          this._emit("error", error);
        }
      }
      settle(out.answer, error);
    } else {
      settle(out.answer, null, msg);
    }
  }

  _subscribed(msg) {
    const sub = this._subscriptions.get(msg.channel);
    const position = msg.position;
    if (sub === undefined || position === undefined) return;
    const previous = sub.position;
    if (previous === null || msg.recovered === undefined) {
      sub._setPosition({ offset: position.offset, epoch: position.epoch }, true);
    } else if (!msg.recovered) {
      const missed = msg.missed ?? null;
      sub._gap(new Gap(sub.channel, msg.reason ?? "not_recovered", missed?.from ?? null, missed?.to ?? null));
      if (position.epoch !== previous.epoch) {
        sub._setPosition({ offset: 0, epoch: position.epoch }); // a new stream: what it kept comes from its start
      } else if (missed !== null) {
        sub._setPosition({ offset: missed.to, epoch: position.epoch });
      }
    }
  }

  // -- tokens ---------------------------------------------------------------------

  /** getToken(), one call shared by everyone who needs it now. */
  _freshToken() {
    if (this._tokenCall === null) {
      this._tokenCall = Promise.resolve().then(() => this._getToken()).finally(() => { this._tokenCall = null; });
    }
    return this._tokenCall;
  }

  async _refreshInPlace() {
    try {
      this._token = await this._freshToken();
    } catch (error) {
      this._emit("error", new ClientError(`getToken failed; the connection closes when the token expires: ${error.message}`));
      return;
    }
    if (this.state === CONNECTED) this._sendNow({ msg: { type: "auth", token: this._token }, kind: CONTROL, answer: null });
  }

  _canRefresh(reason) {
    return this._getToken !== null && reason === "token expired";
  }

  // -- state ----------------------------------------------------------------------

  _setState(state, code = null, reason = "") {
    if (state === this.state && code === null) return;
    this.state = state;
    this.closeCode = code;
    this.closeReason = reason;
    this._emit("state", state, code, reason);
  }

  _emit(event, ...args) {
    for (const callback of this._listeners.get(event) ?? []) this._call(callback, ...args);
  }

  /** An application callback: its exception is reported, never thrown into the client. */
  _call(callback, ...args) {
    try {
      callback(...args);
    } catch (error) {
      if (callback !== this._reportError) this._reportError(error);
    }
  }

  _reportError = (error) => {
    const handlers = this._listeners.get("error");
    if (handlers !== undefined && handlers.size > 0) this._emit("error", error);
    else console.error("wirehub: a callback failed", error);
  };

  _checkOpen() {
    if (this.state === CLOSED) throw new ClientClosed("the client is closed");
  }

  _withTimeout(promise, timeoutMs, what) {
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Timeout(`${what} within ${timeoutMs} ms`)), timeoutMs);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
  }

  /** Closed for good: fail what waits, end the subscriptions. */
  _finish(error, code = null, reason = "") {
    const waiting = [...this._outbox, ...this._inFlight.values()].map((out) => out.answer);
    for (const sub of this._subscriptions.values()) waiting.push(sub._ready);
    for (const waiter of this._waiters) waiting.push(waiter.answer);
    for (const answer of waiting) settle(answer, error);
    this._outbox.clear();
    this._outboxBytes = 0;
    this._inFlight.clear();
    for (const sub of this._subscriptions.values()) sub._end();
    this._setState(CLOSED, code, reason);
    this._closed.abort();
  }
}

/** A started Client (see its options). */
export async function connect(url, options = {}) {
  const client = new Client(url, options);
  await client.start({ timeoutMs: options.startTimeoutMs ?? 10000 });
  return client;
}
