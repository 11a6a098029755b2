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
//   const file = await client.upload(input.files[0], { onProgress });    // {fileId, sha256, ...}
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
// * Uploads files in acknowledged chunks (`upload`); a reconnect resumes each
//   upload, sending only the chunks the gateway does not hold.
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
/**
 * The server answered `error`: `code` is the protocol's error code
 * (docs/protocol.md); an upload's also has `fileId`, and a chunk's `index`.
 */
export class ServerError extends ClientError {
  constructor(code, message) { super(`${code}: ${message}`); this.code = code; }
}

function serverError(msg) {
  const error = new ServerError(msg.code ?? "?", msg.error ?? "");
  if (msg.file_id !== undefined) error.fileId = msg.file_id;
  if (msg.index !== undefined) error.index = msg.index;
  return error;
}

/** Publications of `channel` the application will not see (offsets `first` to `last` when known). */
export class Gap {
  constructor(channel, reason, first = null, last = null) {
    Object.assign(this, { channel, reason, first, last });
  }
}

// -- TLV, the binary codec (docs/protocol.md, "Binary messages") ------------------

const STR = 0, BYTES = 1, U64 = 2, BOOL = 3, F64 = 4, NESTED = 5, HEX = 6, CHUNK = 7, RANGES = 8;
const FIELDS = [
  [0x01, "type", STR], [0x02, "channel", STR], [0x03, "data", BYTES], [0x04, "id", STR],
  [0x05, "offset", U64], [0x06, "exclude_self", BOOL], [0x07, "code", STR], [0x08, "error", STR],
  [0x09, "client_id", STR], [0x0a, "server", STR], [0x10, "token", STR], [0x11, "sub", STR],
  [0x12, "exp", U64], [0x13, "reason", STR], [0x20, "tail", U64], [0x30, "epoch", STR],
  [0x31, "since_offset", U64], [0x32, "since_epoch", STR], [0x33, "recovered", BOOL],
  [0x34, "from", U64], [0x35, "to", U64], [0x36, "dropped", U64], [0x37, "limit", U64],
  [0x38, "reverse", BOOL], [0x39, "max_rate", F64], [0x3a, "key", STR], [0x3b, "publication", NESTED],
  [0x3c, "more", BOOL], [0x3d, "binary", BOOL], [0x3e, "idempotency_key", STR], [0x3f, "duplicate", BOOL],
  // File transfer ("File transfer"): ids and digests are hex strings on this
  // side of the codec, as in JSON, so a message looks the same either way.
  [0x40, "file_id", HEX], [0x41, "name", STR], [0x42, "size", U64], [0x43, "sha256", HEX],
  [0x44, "chunk_size", U64], [0x45, "index", U64], [0x46, "chunk", CHUNK], [0x47, "have", RANGES],
  [0x48, "chunk_count", U64], [0x49, "window", U64], [0x4a, "max_bytes_per_s", U64], [0x4b, "burst_bytes", U64],
];
const BY_TAG = new Map(FIELDS.map(([tag, name, kind]) => [tag, [name, kind]]));
const BY_NAME = new Map(FIELDS.map(([tag, name, kind]) => [name, [tag, kind]]));
const utf8 = new TextEncoder();
const utf8Strict = new TextDecoder("utf-8", { fatal: true });

export const tlv = {
  /**
   * Records of `message`'s known fields; `data` is bytes (a Uint8Array or
   * ArrayBuffer), `file_id` and `sha256` hex strings (or bytes), `have`
   * [[first, last], ...], and `chunk` {file_id, index, count, data}.
   */
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
      } else if (kind === HEX) bytes = fromHex(value);
      else if (kind === CHUNK) bytes = encodeChunk(value);
      else if (kind === RANGES) {
        bytes = new Uint8Array(value.length * 8);
        const view = new DataView(bytes.buffer);
        value.forEach(([first, last], i) => { view.setUint32(i * 8, first); view.setUint32(i * 8 + 4, last); });
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
      else if (kind === HEX) message[name] = toHex(value);
      else if (kind === CHUNK) message[name] = decodeChunk(value);
      else if (kind === RANGES) {
        if (length % 8 !== 0) throw new TypeError("have is not a list of u32 pairs");
        message[name] = [];
        for (let i = start; i < at; i += 8) message[name].push([view.getUint32(i), view.getUint32(i + 4)]);
      } else (message.publications ??= []).push(tlv.decode(value));
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

// A chunk record: file_id (16 bytes), index u32, count u32, then the bytes.
const CHUNK_HEADER = 24;

function encodeChunk({ file_id, index, count, data }) {
  const bytes = asBytes(data);
  const out = new Uint8Array(CHUNK_HEADER + bytes.length);
  const view = new DataView(out.buffer);
  out.set(fromHex(file_id), 0);
  view.setUint32(16, index);
  view.setUint32(20, count);
  out.set(bytes, CHUNK_HEADER);
  return out;
}

function decodeChunk(value) {
  if (value.length < CHUNK_HEADER) throw new TypeError("truncated chunk record");
  const view = new DataView(value.buffer, value.byteOffset, value.byteLength);
  return { file_id: toHex(value.subarray(0, 16)), index: view.getUint32(16), count: view.getUint32(20),
    data: value.subarray(CHUNK_HEADER) };
}

function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Bytes from lowercase or uppercase hex (bytes pass through). */
function fromHex(value) {
  if (isBinary(value)) return asBytes(value);
  if (typeof value !== "string" || !/^(?:[0-9a-fA-F]{2})*$/.test(value)) throw new TypeError(`not hex: ${value}`);
  const out = new Uint8Array(value.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(value.substr(i * 2, 2), 16);
  return out;
}

function isBinary(value) {
  return value instanceof ArrayBuffer || ArrayBuffer.isView(value);
}

function randomKey() {
  return toHex(crypto.getRandomValues(new Uint8Array(16))); // also in insecure contexts, unlike randomUUID
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

// -- uploads (docs/protocol.md, "File transfer") ----------------------------------

const KiB = 1024, MiB = 1024 * KiB;
const DEFAULT_CHUNK_SIZE = 256 * KiB;
const HASH_IN_MEMORY_MAX = 64 * MiB; // a Blob up to this is read whole and hashed natively; larger, in slices
const HASH_SLICE = 4 * MiB;
// The bytes of a chunk's frame beyond the chunk: the `type` record and the `chunk` record's header.
const CHUNK_FRAME_OVERHEAD = 5 + "file_chunk".length + 5 + CHUNK_HEADER;
// The gateway measures its inbound byte limit on its own clock, after the
// network has bunched frames together: pacing at exactly the limit would
// have a chunk refused now and then.
const PACE_MARGIN = 0.9;
// A file_end answered with one of these is mended by a new file_begin: the
// gateway lacks chunks, or lost the partial upload (file_partial_ttl_s).
const BEGIN_AGAIN = new Set(["incomplete_file", "unknown_file"]);
const MAX_FRUITLESS_BEGINS = 3; // begins again that sent nothing before the same answer: a gateway that contradicts itself
const RETRY_MS = 250; // before asking again after a file_begin or file_end was refused rate_limited
const REFUSED_UNREAD = Symbol("refused unread");

const K = Uint32Array.of(
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
);

/**
 * SHA-256 in JavaScript, fed piece by piece: for a Blob too large to hold at
 * once, and where crypto.subtle is missing (an http: page not on localhost),
 * since subtle.digest takes the whole input in one buffer. ~100 MiB/s.
 */
class Sha256 {
  constructor() {
    this.state = Uint32Array.of(0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19);
    this.words = new Uint32Array(64);
    this.pending = new Uint8Array(64); // a block's start, until the rest comes
    this.pendingLength = 0;
    this.length = 0; // bytes hashed
  }

  update(bytes) {
    let at = 0;
    this.length += bytes.length;
    if (this.pendingLength > 0) {
      const take = Math.min(64 - this.pendingLength, bytes.length);
      this.pending.set(bytes.subarray(0, take), this.pendingLength);
      this.pendingLength += take;
      at = take;
      if (this.pendingLength < 64) return this;
      this.blocks(this.pending, 0, 64);
      this.pendingLength = 0;
    }
    const whole = at + ((bytes.length - at) & ~63);
    this.blocks(bytes, at, whole);
    this.pending.set(bytes.subarray(whole));
    this.pendingLength = bytes.length - whole;
    return this;
  }

  digest() {
    const bits = this.length * 8;
    const tail = new Uint8Array(this.pendingLength < 56 ? 64 : 128);
    tail.set(this.pending.subarray(0, this.pendingLength));
    tail[this.pendingLength] = 0x80;
    const view = new DataView(tail.buffer);
    view.setUint32(tail.length - 8, Math.floor(bits / 2 ** 32));
    view.setUint32(tail.length - 4, bits >>> 0);
    this.blocks(tail, 0, tail.length);
    const out = new Uint8Array(32);
    const outView = new DataView(out.buffer);
    for (let i = 0; i < 8; i++) outView.setUint32(i * 4, this.state[i]);
    return out;
  }

  /** The compression function over bytes[start, end), a multiple of 64 bytes (FIPS 180-4, 6.2.2). */
  blocks(bytes, start, end) {
    const w = this.words, s = this.state;
    let h0 = s[0], h1 = s[1], h2 = s[2], h3 = s[3], h4 = s[4], h5 = s[5], h6 = s[6], h7 = s[7];
    for (let p = start; p < end; p += 64) {
      for (let i = 0; i < 16; i++) {
        const j = p + i * 4;
        w[i] = (bytes[j] << 24) | (bytes[j + 1] << 16) | (bytes[j + 2] << 8) | bytes[j + 3];
      }
      for (let i = 16; i < 64; i++) {
        const a = w[i - 15], b = w[i - 2];
        const s0 = ((a >>> 7) | (a << 25)) ^ ((a >>> 18) | (a << 14)) ^ (a >>> 3);
        const s1 = ((b >>> 17) | (b << 15)) ^ ((b >>> 19) | (b << 13)) ^ (b >>> 10);
        w[i] = (w[i - 16] + s0 + w[i - 7] + s1) | 0;
      }
      let a = h0, b = h1, c = h2, d = h3, e = h4, f = h5, g = h6, h = h7;
      for (let i = 0; i < 64; i++) {
        const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
        const t1 = (h + S1 + ((e & f) ^ (~e & g)) + K[i] + w[i]) | 0;
        const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
        const t2 = (S0 + ((a & b) ^ (a & c) ^ (b & c))) | 0;
        h = g; g = f; f = e; e = (d + t1) | 0; d = c; c = b; b = a; a = (t1 + t2) | 0;
      }
      h0 = (h0 + a) | 0; h1 = (h1 + b) | 0; h2 = (h2 + c) | 0; h3 = (h3 + d) | 0;
      h4 = (h4 + e) | 0; h5 = (h5 + f) | 0; h6 = (h6 + g) | 0; h7 = (h7 + h) | 0;
    }
    s[0] = h0; s[1] = h1; s[2] = h2; s[3] = h3; s[4] = h4; s[5] = h5; s[6] = h6; s[7] = h7;
  }
}

/** What an upload reads: {size, bytes (all in memory, or null), read(start, end) -> Promise<Uint8Array>}. */
function uploadSource(data) {
  if (typeof Blob !== "undefined" && data instanceof Blob) {
    return { size: data.size, bytes: null, read: async (start, end) => new Uint8Array(await data.slice(start, end).arrayBuffer()) };
  }
  if (isBinary(data)) {
    const bytes = asBytes(data);
    return { size: bytes.length, bytes, read: async (start, end) => bytes.subarray(start, end) };
  }
  throw new TypeError("upload takes a Blob (or File), an ArrayBuffer or a typed array");
}

/** The SHA-256 of `source`, hex: natively when its bytes may be in memory at once, else in slices. */
async function sha256Of(source) {
  const subtle = globalThis.crypto?.subtle; // only in secure contexts (https:, localhost)
  if (subtle !== undefined && (source.bytes !== null || source.size <= HASH_IN_MEMORY_MAX)) {
    const bytes = source.bytes ?? await source.read(0, source.size);
    return toHex(new Uint8Array(await subtle.digest("SHA-256", bytes)));
  }
  const hash = new Sha256();
  for (let at = 0; at < source.size; at += HASH_SLICE) hash.update(await source.read(at, Math.min(source.size, at + HASH_SLICE)));
  return toHex(hash.digest());
}

/**
 * A token bucket for one connection's chunks: the gateway's inbound byte
 * limit as `file_ready` gives it (rate 0: none). Shared by the uploads on
 * that connection, since the gateway counts their bytes together.
 */
class Pacer {
  constructor(socket, rate, burst, clock) {
    Object.assign(this, { socket, limits: `${rate}/${burst}`, clock });
    this.rate = rate * PACE_MARGIN;
    this.burst = burst * PACE_MARGIN;
    this.tokens = this.burst; // the gateway's bucket starts full with the connection
    this.at = clock.now();
    this.notBefore = 0;
  }

  /** Take `bytes` and return 0, or return the milliseconds to wait before asking again. */
  take(bytes) {
    const now = this.clock.now();
    if (now < this.notBefore) return this.notBefore - now;
    if (this.rate <= 0) return 0;
    this.tokens = Math.min(this.burst, this.tokens + (now - this.at) * this.rate / 1000);
    this.at = now;
    const need = Math.min(bytes, this.burst); // a frame above the burst goes once the bucket is full
    if (this.tokens < need) return Math.max(1, (need - this.tokens) * 1000 / this.rate);
    this.tokens -= bytes;
    return 0;
  }

  /**
   * The gateway refused a frame of about `bytes` for its rate: its bucket is
   * emptier than this one thought (other traffic, a clock that differs), so
   * empty this one too and owe that frame.
   */
  backOff(bytes) {
    if (this.rate > 0) {
      this.take(0); // bring the balance up to now
      this.tokens = Math.min(this.tokens, 0) - bytes;
    } else {
      this.notBefore = Math.max(this.notBefore, this.clock.now() + 100); // no byte limit: its message limit
    }
  }
}

/**
 * One file going up (Client.upload). Hashed first; then, on each connection,
 * `file_begin` and only the chunks the gateway's `have` lacks, at most
 * `window` unacknowledged and paced to its byte rate, then `file_end`. A
 * connection that drops just means a new `file_begin` on the next one: the
 * gateway's `have` is exact (it waits for chunks still being written), so
 * what was acknowledged, or arrived unacknowledged, is never sent again.
 */
class Upload {
  constructor(client, source, { fileId, name, channel, chunkSize, sha256, onProgress }) {
    Object.assign(this, { fileId, name, channel, chunkSize, sha256 });
    this.size = source.size;
    this.count = Math.ceil(source.size / chunkSize);
    this.chunksSent = 0; // over every connection, for the application to see what resuming saved
    this.begins = 0;
    this._client = client;
    this._source = source;
    this._onProgress = onProgress;
    this._held = new Uint8Array(this.count); // 1: the gateway has chunk i on disk
    this._heldCount = 0;
    this._heldBytes = 0;
    this._unacked = new Map(); // index -> length: sent on this connection, not acknowledged yet
    this._refused = []; // chunks refused rate_limited, to send again
    this._pacer = null;
    this._failure = null; // a chunk refused for good
    this._beginAgain = false; // the gateway lost the upload (unknown_file), or a chunk unread
    this._waitingAnswer = null; // while a file_begin or file_end waits: resolved to ask again
    this._wake = null;
  }

  async run() {
    const client = this._client;
    this.sha256 ??= await sha256Of(this._source);
    let fruitless = 0;
    for (;;) {
      await client._untilConnected();
      const ready = await this._request(this._beginMessage());
      if (ready === null) continue;
      const socket = client._socket; // the one that answered (an answer runs before any close is seen)
      this.begins += 1;
      if (ready.chunk_count !== this.count) {
        throw new ClientError(`the gateway counts ${ready.chunk_count} chunks for ${this.fileId}, not ${this.count}`);
      }
      this._hold(ready.have ?? []);
      const sentBefore = this.chunksSent;
      if (!(await this._sendMissing(socket, ready))) continue;
      let done;
      try {
        done = await this._request({ type: "file_end", file_id: this.fileId });
      } catch (error) {
        if (!(error instanceof ServerError && BEGIN_AGAIN.has(error.code))) throw error;
        fruitless = this.chunksSent > sentBefore ? 0 : fruitless + 1;
        if (fruitless >= MAX_FRUITLESS_BEGINS) throw error;
        continue;
      }
      if (done === null) continue;
      return {
        fileId: done.file_id ?? this.fileId, name: done.name, size: done.size, sha256: done.sha256,
        channel: done.channel ?? null, chunksSent: this.chunksSent, begins: this.begins,
      };
    }
  }

  /**
   * The answer to `msg` (file_begin, file_end; both may be sent again), or
   * null if the connection dropped first: begin again on the next one.
   * Refused `rate_limited`, it is asked again after a pause; that includes a
   * refusal by the gateway's rate limiter, which does not read the message
   * and so answers without its `id` (`_refusedUnread`).
   */
  async _request(msg) {
    const client = this._client;
    for (;;) {
      const refused = deferred();
      this._waitingAnswer = refused;
      try {
        const answer = await Promise.race([client._send({ ...msg }, REQUEST), refused.promise]);
        if (answer !== REFUSED_UNREAD) return answer;
      } catch (error) {
        if (error instanceof ConnectionLost) return null;
        if (!(error instanceof ServerError && error.code === "rate_limited")) throw error;
      } finally {
        this._waitingAnswer = null;
      }
      await client._clock.sleep(RETRY_MS, client._closed.signal);
    }
  }

  _beginMessage() {
    const msg = { type: "file_begin", file_id: this.fileId, name: this.name, size: this.size, sha256: this.sha256, chunk_size: this.chunkSize };
    if (this.channel !== null) msg.channel = this.channel;
    return msg;
  }

  /**
   * Send the chunks the gateway lacks over `socket`: true once it holds all,
   * false to begin again (the connection dropped, or the gateway lost the upload).
   */
  async _sendMissing(socket, ready) {
    const client = this._client;
    const window = Math.max(1, ready.window ?? 1);
    this._pacer = client._pacerFor(socket, ready.max_bytes_per_s ?? 0, ready.burst_bytes ?? 0);
    this._unacked.clear();
    this._refused = [];
    this._beginAgain = false;
    this._progress();
    let next = 0; // chunks below it were sent on this connection or are held
    for (;;) {
      if (this._failure !== null) throw this._failure;
      if (client.state === CLOSED) throw client._closedError();
      if (client._socket !== socket || this._beginAgain) return false;
      if (this._heldCount === this.count) return true;
      while (next < this.count && this._held[next]) next++;
      const index = this._refused.length > 0 ? this._refused[0] : next < this.count ? next : -1;
      if (index < 0 || this._unacked.size >= window) {
        await new Promise((resolve) => { this._wake = resolve; }); // an ack, a refusal, a drop or a close
        continue;
      }
      const length = this._length(index);
      const delay = this._pacer.take(length + CHUNK_FRAME_OVERHEAD);
      if (delay > 0) {
        await client._clock.sleep(delay, client._closed.signal);
        continue;
      }
      if (index === this._refused[0]) this._refused.shift(); else next++;
      const start = index * this.chunkSize;
      const data = await this._source.read(start, start + length);
      if (client._socket !== socket) return false;
      socket.send(tlv.encode({ type: "file_chunk", chunk: { file_id: this.fileId, index, count: this.count, data } }));
      this._unacked.set(index, length);
      this.chunksSent += 1;
    }
  }

  /** `have` from file_ready: what the gateway holds, exactly (it may have lost some). */
  _hold(have) {
    this._held.fill(0);
    this._heldCount = this._heldBytes = 0;
    for (const [first, last] of have) {
      for (let i = first; i <= Math.min(last, this.count - 1); i++) this._mark(i);
    }
  }

  _mark(index) {
    if (!(index >= 0 && index < this.count) || this._held[index]) return false;
    this._held[index] = 1;
    this._heldCount += 1;
    this._heldBytes += this._length(index);
    return true;
  }

  _length(index) {
    return index === this.count - 1 ? this.size - index * this.chunkSize : this.chunkSize;
  }

  // Called by the client, from its socket's messages and state.

  _acked(index) {
    this._unacked.delete(index);
    if (this._mark(index)) this._progress();
    this._poke();
  }

  /** A chunk's `error` (it carries `file_id` and `index`, no `id`). */
  _chunkRefused(msg) {
    const index = msg.index;
    const length = this._unacked.get(index);
    this._unacked.delete(index);
    if (msg.code === "duplicate_chunk") this._mark(index); // it arrived before, unacknowledged
    else if (msg.code === "rate_limited") {
      if (length !== undefined) { // (else sent before the last file_begin, which knows)
        this._refused.push(index);
        this._pacer?.backOff(length + CHUNK_FRAME_OVERHEAD);
      }
    } else if (msg.code === "unknown_file") this._beginAgain = true; // expired: the next begin starts it afresh
    else this._failure ??= serverError(msg);
    this._poke();
  }

  /**
   * The gateway's rate limiter refused one of the connection's messages
   * without reading it, so its error names no file, chunk or id: if this
   * upload waits for an answer, it may never come, so ask again; if chunks
   * are unacknowledged, one may be lost, so begin again: `have` says which.
   */
  _refusedUnread() {
    if (this._waitingAnswer !== null) settle(this._waitingAnswer, null, REFUSED_UNREAD);
    else if (this._unacked.size > 0) this._beginAgain = true;
    this._poke();
  }

  _poke() {
    const wake = this._wake;
    this._wake = null;
    if (wake !== null) wake();
  }

  _progress() {
    if (this._onProgress === null) return;
    let sent = this._heldBytes;
    for (const length of this._unacked.values()) sent += length;
    this._client._call(this._onProgress, { sent, acked: this._heldBytes, total: this.size });
  }
}

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
    this._whenClosed = new Promise((resolve) => this._closed.signal.addEventListener("abort", resolve, { once: true }));
    this._closedBy = null; // the error everything waiting failed with
    this._uploads = new Map(); // file_id (hex) -> Upload
    this._pacer = null; // the current connection's, shared by its uploads
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
   * "message": (msg) for every server message but publications and file_ack.
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

  /**
   * Upload `data` (a Blob or File, an ArrayBuffer, a typed array: not to be
   * changed until this settles) to the gateway's file store, chunk by chunk.
   * Resolves to {fileId, name, size, sha256, channel, chunksSent, begins}
   * once the gateway has the whole file and its SHA-256 matched; rejects with
   * ServerError (`code`: invalid_name, file_too_large, quota_exceeded,
   * forbidden, checksum_mismatch, ...) or ClientClosed. Waits while
   * disconnected, and a dropped connection resumes: only the chunks the
   * gateway lacks are sent again. `onProgress({sent, acked, total})`, in
   * bytes, on each acknowledgement; `fileId` (32 hex digits) and `sha256`
   * let a new page resume an upload an earlier one started.
   */
  async upload(data, { name = data?.name, channel = null, chunkSize = DEFAULT_CHUNK_SIZE, fileId = null, sha256 = null,
    onProgress = null } = {}) {
    this._checkOpen();
    const source = uploadSource(data);
    if (typeof name !== "string") throw new TypeError("an upload needs a name (a File has its own)");
    if (!Number.isInteger(chunkSize) || chunkSize < KiB) throw new TypeError(`chunkSize must be an integer >= 1024, not ${chunkSize}`);
    fileId = fileId === null ? randomKey() : String(fileId).toLowerCase();
    if (!/^[0-9a-f]{32}$/.test(fileId)) throw new TypeError(`fileId must be 32 hex digits, not ${fileId}`);
    if (sha256 !== null && !/^[0-9a-f]{64}$/.test(sha256 = String(sha256).toLowerCase())) {
      throw new TypeError("sha256 must be 64 hex digits");
    }
    if (this._uploads.has(fileId)) throw new ClientError(`${fileId} is being uploaded already`);
    const upload = new Upload(this, source, { fileId, name, channel, chunkSize, sha256, onProgress });
    this._uploads.set(fileId, upload);
    try {
      return await upload.run();
    } finally {
      this._uploads.delete(fileId);
    }
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
   * requests in flight fail; subscribes are redone by the next connection,
   * uploads by a file_begin on it. */
  _onDisconnected() {
    for (const upload of this._uploads.values()) upload._poke();
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

  /** Resolves once connected and authenticated (at once if it is); ClientClosed once closed. */
  async _untilConnected() {
    for (;;) {
      if (this.state === CLOSED) throw this._closedError();
      if (this.state === CONNECTED && this._connected.done && this._socket !== null) return;
      await Promise.race([this._connected.promise, this._whenClosed]);
    }
  }

  /** A message refused unread (`Upload._refusedUnread`): it may have been any upload's chunk. */
  _refusedUnread() {
    let frame = 0;
    for (const upload of this._uploads.values()) {
      frame = Math.max(frame, upload.chunkSize + CHUNK_FRAME_OVERHEAD);
      upload._refusedUnread();
    }
    if (this._pacer?.socket === this._socket) this._pacer.backOff(frame);
  }

  /** The pacer of the connection `socket`, for the limits its file_ready gave. */
  _pacerFor(socket, rate, burst) {
    if (this._pacer?.socket !== socket || this._pacer.limits !== `${rate}/${burst}`) {
      this._pacer = new Pacer(socket, rate, burst, this._clock);
    }
    return this._pacer;
  }

  // -- receiving ------------------------------------------------------------------

  _dispatch(msg) {
    const type = msg.type;
    if (type === "message") {
      this._subscriptions.get(msg.channel)?._offer(msg.offset, msg.data);
      return;
    }
    if (type === "file_ack") {
      this._uploads.get(msg.file_id)?._acked(msg.index);
      return; // one per chunk: kept out of waitFor's history and the "message" event, like publications
    }
    if (type === "error" && msg.id === undefined && this._uploads.size > 0) {
      if (msg.file_id !== undefined) this._uploads.get(msg.file_id)?._chunkRefused(msg);
      else if (msg.code === "rate_limited") this._refusedUnread();
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
      const error = serverError(msg);
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

  _closedError() {
    return this._closedBy ?? new ClientClosed("the client is closed");
  }

  _withTimeout(promise, timeoutMs, what) {
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Timeout(`${what} within ${timeoutMs} ms`)), timeoutMs);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
  }

  /** Closed for good: fail what waits, end the subscriptions and uploads. */
  _finish(error, code = null, reason = "") {
    this._closedBy = error;
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
    for (const upload of this._uploads.values()) upload._poke(); // each sees CLOSED and fails with `error`
  }
}

/** A started Client (see its options). */
export async function connect(url, options = {}) {
  const client = new Client(url, options);
  await client.start({ timeoutMs: options.startTimeoutMs ?? 10000 });
  return client;
}
