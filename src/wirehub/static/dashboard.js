// dashboard.js: the /dashboard page (docs/operations.md, "Dashboard").
//
// One ES module on top of the bundled client (wirehub.js): no framework, no
// build step, nothing fetched from anywhere but the gateway that serves it.
// It shows the $sys:metrics channel (numbers, charts of the last minutes, the
// busiest channels), the `runners` channel, and the live log of the runner
// clicked (`logs:<id>`, docs/docker.md).
//
// Everything it renders that came over the wire (log lines, channel and
// runner names, error texts) goes through textContent or attributes set one
// by one: it never builds HTML from data.
//
// The token comes from the login form or `?token=`; it is kept in
// sessionStorage (this tab only) and taken out of the address bar at once.

import { Client, CLOSED, CONNECTED, CONNECTING, DISCONNECTED } from "../wirehub.js";

const TOKEN_KEY = "wirehub.dashboard.token";
const METRICS = "$sys:metrics";
const RUNNERS = "runners";
const CHART_WINDOW_S = 600; // the charts show the last ten minutes
const LOG_TAIL = 500; // lines of history shown when a log opens
const MAX_LOG_LINES = 5000; // in the view, and waiting while paused
const NO_TIMEOUT_MS = 2 ** 31 - 1; // start(): keep trying until connected (or refused)

// -- small DOM helpers: text only ---------------------------------------------------

const $ = (id) => document.getElementById(id);

/** An element with a class and text (textContent: never parsed as HTML). */
function el(tag, className = "", text = null) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null) node.textContent = String(text);
  return node;
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attributes) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  return node;
}

function setStatus(node, text, kind = "") {
  node.textContent = text;
  if (kind) node.dataset.kind = kind; else delete node.dataset.kind;
}

// -- formatting ---------------------------------------------------------------------

const integer = new Intl.NumberFormat("en", { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat("en", { maximumFractionDigits: 1 });

function formatCount(value) { return integer.format(value); }
function formatRate(value) { return value >= 100 ? integer.format(value) : decimal.format(value); }
function formatBytes(value) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit++; }
  return `${unit === 0 ? integer.format(value) : decimal.format(value)} ${units[unit]}`;
}
function formatDuration(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds / 3600) % 24, m = Math.floor(seconds / 60) % 60;
  if (d > 0) return `${d} d ${h} h`;
  if (h > 0) return `${h} h ${m} min`;
  if (m > 0) return `${m} min ${seconds % 60} s`;
  return `${seconds} s`;
}
function clockTime(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString("en-GB", { hour12: false });
}

/** What a refused subscribe or request means, for a person. */
function explain(error, permission = null) {
  const code = error?.code;
  if (code === "forbidden") return `not allowed${permission ? `: the token needs ${permission}` : ""}`;
  if (code === "not_authenticated") return "this gateway needs a token: paste one above";
  if (code === "engine_unavailable") return "the Docker engine cannot be reached";
  if (code === "container_not_found") return "no such container (any more)";
  return error?.message ?? String(error);
}

// -- the token ----------------------------------------------------------------------

/** `?token=` moves to sessionStorage and leaves the address bar (and history). */
function tokenFromAddress() {
  const url = new URL(location.href);
  if (url.searchParams.has("token")) {
    const token = url.searchParams.get("token").trim();
    url.searchParams.delete("token");
    history.replaceState(history.state, "", url.pathname + url.search + url.hash);
    if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

/**
 * The claims of a JWT, read without verifying it: only to label the page and to
 * decide which buttons to show. The gateway checks every command itself.
 */
function claimsOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(part.padEnd(Math.ceil(part.length / 4) * 4, "="));
    const claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))));
    return claims !== null && typeof claims === "object" ? claims : {};
  } catch {
    return {};
  }
}

function wsUrl() {
  // Relative to the page, so that a gateway behind a path prefix still works.
  const path = document.documentElement.dataset.wsPath || "/ws";
  const url = new URL(path.replace(/^\/+/, ""), location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = url.hash = "";
  return url.href;
}

// -- metrics --------------------------------------------------------------------------

const CHARTS = [
  ["connections", "connections", formatCount],
  ["subscriptions", "subscriptions", formatCount],
  ["publications_per_s", "publications/s", formatRate],
  ["deliveries_per_s", "deliveries/s", formatRate],
  ["bytes_in_per_s", "bytes in/s", formatBytes],
  ["bytes_out_per_s", "bytes out/s", formatBytes],
];
const COUNTERS = [
  ["channels", "channels with subscribers", formatCount, false],
  ["patterns", "pattern subscriptions", formatCount, false],
  ["messages_in_per_s", "messages in/s", formatRate, false],
  ["docker_log_streams", "container logs followed", formatCount, false],
  ["slow_consumer_closes_total", "slow consumers closed", formatCount, true],
  ["lagged_total", "lagged notices", formatCount, true],
  ["dropped_total", "publications skipped", formatCount, true],
  ["rate_limited_total", "rate-limited messages", formatCount, true],
  ["forbidden_total", "refused by permissions", formatCount, true],
  ["refused_connections_total", "connections refused", formatCount, true],
  ["gc_collections_total", "collector runs", formatCount, true],
  ["gc_pause_seconds_total", "collector pauses (s)", (v) => v.toFixed(3), true],
];
const CHART_W = 240, CHART_H = 56;
const MAX_SAMPLES = 1200; // a short --metrics-interval-s: the newest 1,200 of the ten minutes

class MetricsView {
  constructor() {
    this.samples = []; // {ts, total}, oldest first, the last CHART_WINDOW_S seconds
    this.charts = new Map();
    const box = $("charts");
    box.replaceChildren();
    for (const [field, label] of CHARTS) {
      const figure = el("figure", "chart");
      figure.dataset.field = field;
      const caption = el("figcaption");
      const value = el("span", "value", "–");
      caption.append(el("span", "", label), value);
      const chart = svg("svg", { viewBox: `0 0 ${CHART_W} ${CHART_H}`, preserveAspectRatio: "none", role: "img" });
      chart.setAttribute("aria-label", `${label}, last ${CHART_WINDOW_S / 60} minutes`);
      chart.dataset.points = "0";
      const area = svg("path", { class: "area", d: "" });
      const line = svg("polyline", { class: "line", points: "" });
      chart.append(area, line);
      const scale = el("div", "scale");
      const peak = el("span", "", "");
      const span = el("span", "", "");
      scale.append(span, peak);
      figure.append(caption, chart, scale);
      box.append(figure);
      this.charts.set(field, { value, chart, area, line, peak, span });
    }
    $("counters").tBodies[0].replaceChildren();
    $("top-channels").replaceChildren();
    setStatus($("metrics-status"), "waiting for the first sample…");
    setStatus($("channels-status"), "");
    $("metrics-about").textContent = "";
  }

  error(text) {
    setStatus($("metrics-status"), `Metrics: ${text}`, "error");
    setStatus($("channels-status"), "needs the metrics channel", "error");
  }

  add(data) {
    const metrics = data?.metrics;
    if (metrics === undefined || typeof data.ts !== "number") return;
    const last = this.samples.at(-1);
    const previous = last?.total ?? null;
    if (last !== undefined && data.ts < last.ts) this.samples = []; // a restarted gateway's clock
    this.samples.push({ ts: data.ts, total: metrics.total });
    const oldest = data.ts - CHART_WINDOW_S;
    let drop = 0;
    while (drop < this.samples.length - 1 && (this.samples[drop].ts < oldest || this.samples.length - drop > MAX_SAMPLES)) drop++;
    if (drop > 0) this.samples.splice(0, drop);
    this.render(data, metrics, previous);
  }

  render(data, metrics, previous) {
    const total = metrics.total;
    const nodes = metrics.nodes ?? [];
    const about = nodes.length === 1
      ? `${nodes[0].node}, up ${formatDuration(nodes[0].uptime_s)}`
      : `${nodes.length} nodes`;
    $("metrics-about").textContent = `${about}, a sample every ${decimal.format(metrics.interval_s)} s`;
    setStatus($("metrics-status"), `last sample ${clockTime(data.ts)}`);
    for (const [field, , format] of CHARTS) this.drawChart(field, format, total[field]);
    const rows = [];
    for (const [field, label, format, isTotal] of COUNTERS) {
      if (typeof total[field] !== "number") continue;
      const row = el("tr");
      row.dataset.field = field;
      const change = isTotal && previous !== null && typeof previous[field] === "number"
        ? total[field] - previous[field] : null;
      row.append(el("td", "", label), el("td", "", format(total[field])),
                 el("td", "", change === null ? "" : `${change >= 0 ? "+" : ""}${format(change)}`));
      rows.push(row);
    }
    $("counters").tBodies[0].replaceChildren(...rows);
    this.renderTopChannels(total.top_channels ?? nodes[0]?.top_channels);
  }

  drawChart(field, format, current) {
    const chart = this.charts.get(field);
    chart.value.textContent = typeof current === "number" ? format(current) : "–";
    const points = this.samples.filter((s) => typeof s.total[field] === "number");
    chart.chart.dataset.points = String(points.length);
    if (points.length === 0) return;
    // The chart spans the samples it has, up to CHART_WINDOW_S: a page opened
    // a minute ago fills its width with that minute.
    const start = points[0].ts, span = Math.max(points.at(-1).ts - start, 1e-6);
    const peak = Math.max(...points.map((s) => s.total[field]));
    const scaleTo = peak > 0 ? peak : 1;
    const xy = points.map((s) => [
      ((s.ts - start) / span) * CHART_W,
      CHART_H - 2 - (s.total[field] / scaleTo) * (CHART_H - 6),
    ]);
    if (xy.length === 1) xy.unshift([Math.max(0, xy[0][0] - 4), xy[0][1]]); // one sample: a short dash
    const line = xy.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
    chart.line.setAttribute("points", line);
    chart.area.setAttribute("d", `M${xy[0][0].toFixed(1)},${CHART_H} L${line.replaceAll(" ", " L")} `
      + `L${xy.at(-1)[0].toFixed(1)},${CHART_H} Z`);
    chart.peak.textContent = `max ${format(peak)}`;
    chart.span.textContent = points.length > 1 ? `last ${formatDuration(span)}` : "";
  }

  renderTopChannels(top) {
    const body = $("top-channels");
    if (!Array.isArray(top)) {
      setStatus($("channels-status"), "this gateway does not report its busiest channels");
      body.replaceChildren();
      return;
    }
    setStatus($("channels-status"), top.length === 0 ? "no channel has a subscriber" : "");
    body.replaceChildren(...top.map((entry) => {
      const row = el("tr");
      row.dataset.channel = String(entry.channel);
      const name = el("td", "mono", entry.channel);
      row.append(name, el("td", "num", formatCount(entry.subscribers)));
      return row;
    }));
  }
}

// -- the log viewer -------------------------------------------------------------------

class LogView {
  constructor(session) {
    this.session = session;
    this.generation = 0;
    this.sub = null;
    this.runner = null;
    this.following = true;
    this.waiting = []; // received, not shown yet (paused, or until the next frame)
    this.frame = null;
    this.opening = null; // the channel whose subscribe is in flight
    this.lines = 0; // .line rows in the view
    this.shown = 0; // of which the filter shows
    this.box = $("log");
    const controls = new AbortController();
    this.controls = controls;
    const on = (id, event, handler) => $(id).addEventListener(event, handler, { signal: controls.signal });
    on("log-pause", "click", () => this.pause());
    on("log-follow", "click", () => this.follow());
    on("log-close", "click", () => this.close());
    on("log-filter", "input", () => this.refilter());
    on("log-stdout", "change", () => this.refilter());
    on("log-stderr", "change", () => this.refilter());
  }

  /** Show `runner`'s log: the last LOG_TAIL lines, then every new one. */
  async open(runner) {
    const channel = `logs:${runner.id}`;
    if (this.opening === channel || (this.sub?.channel === channel && !$("log-panel").hidden)) return; // shown already
    this.stop();
    const generation = ++this.generation;
    const current = () => generation === this.generation && !this.session.closed;
    const client = this.session.client;
    this.runner = runner;
    this.clear();
    this.following = true;
    this.updateButtons();
    $("log-panel").hidden = false;
    $("log-title").textContent = runner.name || runner.id.slice(0, 12);
    $("log-channel").textContent = channel;
    setStatus($("log-status"), "subscribing…");
    this.session.markSelected();
    let sub;
    this.opening = channel;
    try {
      sub = await client.subscribe(channel);
    } catch (error) {
      if (current()) setStatus($("log-status"), `Cannot follow this log: ${explain(error, `a subscribe claim for ${channel}`)}`, "error");
      return;
    } finally {
      this.opening = null;
    }
    if (!current()) {
      sub.unsubscribe();
      return;
    }
    this.sub = sub;
    // Until the tail is in, live lines wait behind it. After that the view
    // appends exactly what the subscription delivers: the client resumes it
    // with `since` after a reconnect and never hands over an offset twice.
    let held = [];
    sub.onMessage = (msg) => {
      if (!current()) return;
      if (held !== null) held.push(msg); else this.add(msg);
    };
    sub.onGap = (gap) => {
      if (!current()) return;
      const which = gap.first !== null && gap.last !== null ? `lines ${gap.first}–${gap.last}` : "some lines";
      this.queue({ marker: `${which} could not be recovered (${gap.reason})` });
    };
    const position = sub.position;
    let shown = 0; // the tail covers the offsets up to this one
    setStatus($("log-status"), "");
    if (position !== null && position.offset > 0) {
      try {
        const page = await client.request({
          type: "history", channel, limit: LOG_TAIL, reverse: true,
          since: { offset: position.offset + 1, epoch: position.epoch },
        });
        if (!current()) return;
        const tail = (page.publications ?? []).filter((p) => p.offset <= position.offset).reverse();
        for (const publication of tail) this.add(publication);
        shown = position.offset;
      } catch (error) {
        if (!current()) return;
        this.queue({ marker: `earlier lines are not shown: ${explain(error)}` });
      }
    }
    const live = held;
    held = null;
    // An ended log's `stream_end` arrives live at the subscribed offset too (a
    // snapshot, docs/docker.md): the tail has shown it already.
    for (const msg of live) if (msg.offset > shown) this.add(msg);
  }

  /** Stop following (the view stays). */
  stop() {
    this.generation++;
    if (this.frame !== null) cancelAnimationFrame(this.frame);
    this.frame = null;
    const sub = this.sub;
    this.sub = null;
    if (sub !== null && !this.session.closed) sub.unsubscribe();
  }

  close() {
    this.stop();
    this.runner = null;
    this.clear();
    $("log-panel").hidden = true;
    this.session.markSelected();
  }

  clear() {
    this.box.replaceChildren();
    this.waiting = [];
    this.lines = this.shown = 0;
    this.updateCounts();
  }

  dispose() {
    this.stop();
    this.controls.abort();
  }

  add(publication) {
    const data = publication.data;
    if (data !== null && typeof data === "object" && data.type === "stream_end") {
      const code = data.exit_code !== null && data.exit_code !== undefined ? `, exit code ${data.exit_code}` : "";
      const why = data.error ? `: ${data.error}` : "";
      this.queue({ marker: `the log ended (${data.reason ?? "end"}${code})${why}`, offset: publication.offset });
      return;
    }
    let text, stream = "stdout", ts = "";
    if (data !== null && typeof data === "object" && typeof data.line === "string") {
      text = data.truncated ? `${data.line} [truncated]` : data.line;
      stream = data.stream === "stderr" ? "stderr" : "stdout";
      ts = typeof data.ts === "string" ? data.ts : "";
    } else {
      text = typeof data === "string" ? data : JSON.stringify(data);
    }
    this.queue({ offset: publication.offset, stream, ts, text });
  }

  queue(entry) {
    this.waiting.push(entry);
    if (this.waiting.length > MAX_LOG_LINES) this.waiting.splice(0, this.waiting.length - MAX_LOG_LINES);
    if (this.following) {
      this.frame ??= requestAnimationFrame(() => { this.frame = null; this.flush(); });
    } else {
      this.updatePending();
    }
  }

  flush() {
    if (!this.following || this.waiting.length === 0) return;
    const rows = document.createDocumentFragment();
    for (const entry of this.waiting) rows.append(this.render(entry));
    this.waiting = [];
    this.box.append(rows);
    let excess = this.box.childElementCount - MAX_LOG_LINES;
    while (excess-- > 0) {
      const row = this.box.firstElementChild;
      if (row.classList.contains("line")) {
        this.lines--;
        if (!row.hidden) this.shown--;
      }
      row.remove();
    }
    this.box.scrollTop = this.box.scrollHeight;
    this.updateCounts();
  }

  render(entry) {
    if (entry.marker !== undefined) {
      const marker = el("div", "marker", `— ${entry.marker} —`);
      if (entry.offset !== undefined) marker.dataset.offset = String(entry.offset);
      return marker;
    }
    const row = el("div", `line ${entry.stream}`);
    row.dataset.offset = String(entry.offset);
    row.dataset.stream = entry.stream;
    const ts = el("span", "ts", /^\d{4}-\d\d-\d\dT(\d\d:\d\d:\d\d(\.\d{1,3})?)/.exec(entry.ts)?.[1] ?? "");
    if (entry.ts) ts.title = entry.ts;
    row.append(ts, el("span", "stream", entry.stream === "stderr" ? "err" : "out"), el("span", "text", entry.text));
    row.hidden = !this.matches(row);
    this.lines++;
    if (!row.hidden) this.shown++;
    return row;
  }

  matches(row) {
    if (!$(row.dataset.stream === "stderr" ? "log-stderr" : "log-stdout").checked) return false;
    const filter = $("log-filter").value.toLowerCase();
    return filter === "" || row.lastChild.textContent.toLowerCase().includes(filter);
  }

  refilter() {
    this.shown = 0;
    for (const row of this.box.querySelectorAll(".line")) {
      row.hidden = !this.matches(row);
      if (!row.hidden) this.shown++;
    }
    this.updateCounts();
  }

  pause() {
    this.following = false;
    this.updateButtons();
    this.updateCounts();
  }

  follow() {
    this.following = true;
    this.updateButtons();
    this.flush();
    this.updatePending();
  }

  updateButtons() {
    $("log-pause").disabled = !this.following;
    $("log-follow").disabled = this.following;
  }

  updateCounts() {
    $("log-count").textContent = this.shown === this.lines
      ? `${formatCount(this.lines)} lines` : `${formatCount(this.shown)} of ${formatCount(this.lines)} lines shown`;
    this.updatePending();
  }

  updatePending() {
    const waiting = this.following ? 0 : this.waiting.length;
    $("log-pending").textContent = waiting === 0 ? "" : `paused: ${formatCount(waiting)} new`;
    $("log-pending").dataset.count = String(waiting);
  }
}

// -- a session: one token, one client -------------------------------------------------

class Session {
  constructor(token) {
    this.token = token;
    this.claims = token ? claimsOf(token) : {};
    const permissions = Array.isArray(this.claims.permissions) ? this.claims.permissions : [];
    // A hint for the page only: the gateway refuses the commands without it.
    this.canControl = permissions.includes("runners:delete") || permissions.includes("admin");
    this.closed = false;
    this.lastClose = null;
    this.runners = new Map();
    this.client = new Client(wsUrl(), token ? { token } : {});
    this.client.on("state", (state, code, reason) => this.onState(state, code, reason));
    this.client.on("message", (msg) => this.onServerMessage(msg));
    this.metrics = new MetricsView();
    this.log = new LogView(this);
    this.runnersSub = null;
    this.listed = false; // an initial_state arrived
    $("runners").replaceChildren();
    setStatus($("runners-status"), "waiting for the runner list…");
    setStatus($("runner-result"), "");
    $("log-panel").hidden = true;
    this.showIdentity();
  }

  async run() {
    this.onState(CONNECTING, null, "");
    try {
      await this.client.start({ timeoutMs: NO_TIMEOUT_MS });
    } catch {
      return; // closed for good: the state and the notice say why
    }
    if (this.closed) return;
    this.watchMetrics();
    this.watchRunners();
  }

  close() {
    this.closed = true;
    this.log.dispose();
    return this.client.close();
  }

  showIdentity() {
    const loggedIn = this.token !== null;
    $("who").hidden = !loggedIn;
    $("logout").hidden = !loggedIn;
    $("login").hidden = loggedIn;
    if (loggedIn) {
      const sub = typeof this.claims.sub === "string" ? this.claims.sub : "a token";
      $("who").textContent = `logged in as ${sub}${this.canControl ? " (may stop and delete runners)" : ""}`;
    }
  }

  onState(state, code, reason) {
    if (this.closed) return;
    if (code !== null) this.lastClose = `${code}${reason ? ` ${reason}` : ""}`;
    const node = $("state");
    node.dataset.state = state;
    node.dataset.code = code === null ? "" : String(code);
    let text = { [CONNECTING]: "connecting…", [CONNECTED]: "connected", [DISCONNECTED]: "disconnected", [CLOSED]: "closed" }[state] ?? state;
    if (state === DISCONNECTED) text += ` (close ${this.lastClose ?? "without a code"}), reconnecting…`;
    else if (state === CONNECTING && this.lastClose !== null) text += ` (last close ${this.lastClose})`;
    else if (state === CLOSED && code !== null) text += ` (close ${this.lastClose})`;
    node.textContent = text;
    node.title = new Date().toLocaleString();
    if (state === CLOSED) {
      // What never arrived will not now (an explanation already shown stays).
      if (this.metrics.samples.length === 0 && !$("metrics-status").dataset.kind) setStatus($("metrics-status"), "not connected");
      if (!this.listed && !$("runners-status").dataset.kind) setStatus($("runners-status"), "not connected");
    }
    if (state === CLOSED && code === 1008 && !$("notice").dataset.auth) {
      this.refused(/expired/.test(reason) ? "The token has expired: paste a new one."
        : `The gateway closed the connection: ${reason || "policy violation"}.`);
    }
    if (state === CONNECTED && this.lastClose === null) notice("");
  }

  onServerMessage(msg) {
    if (this.closed) return;
    if (msg.type === "auth_error") {
      if (msg.code === "auth_not_configured") {
        this.canControl = false; // an open gateway grants no permissions
        this.showIdentity();
        notice("This gateway is open: it needs no token, and grants no permissions with one.", "info");
      } else {
        this.refused(`The gateway refused the token: ${msg.error ?? msg.code}`);
      }
    }
  }

  refused(text) {
    sessionStorage.removeItem(TOKEN_KEY);
    this.token = null;
    this.canControl = false;
    this.showIdentity();
    notice(text, "error", true);
    this.renderRunners();
  }

  // -- metrics

  async watchMetrics() {
    let sub;
    try {
      sub = await this.client.subscribe(METRICS);
    } catch (error) {
      if (this.closed) return;
      this.metrics.error(explain(error, "the sys:metrics permission"));
      if (error?.code === "not_authenticated") notice("This gateway needs a token: paste one above.", "error", true);
      return;
    }
    sub.onMessage = (msg) => { if (!this.closed) this.metrics.add(msg.data); };
  }

  // -- runners

  async watchRunners() {
    let sub;
    try {
      sub = await this.client.subscribe(RUNNERS);
    } catch (error) {
      if (!this.closed) setStatus($("runners-status"), `Runners: ${explain(error, `a subscribe claim for ${RUNNERS}`)}`, "error");
      return;
    }
    if (this.closed) return;
    this.runnersSub = sub;
    sub.onMessage = (msg) => { if (!this.closed) this.onRunners(msg.data); };
    if (this.runners.size === 0) {
      setStatus($("runners-status"), "no runner list yet (the gateway serves one with --docker)");
    }
  }

  onRunners(data) {
    if (data === null || typeof data !== "object") return;
    if (data.type === "initial_state" && Array.isArray(data.runners)) {
      this.runners = new Map(data.runners.map((runner) => [runner.id, runner]));
      this.listed = true;
      setStatus($("runners-status"), this.runners.size === 0 ? "no runners" : "");
    } else if (data.type === "runner_update" && data.runner?.id) {
      if (data.action === "deleted") this.runners.delete(data.runner.id);
      else this.runners.set(data.runner.id, data.runner);
      if (this.runners.size > 0 || this.listed) setStatus($("runners-status"), this.runners.size === 0 ? "no runners" : "");
    } else if (data.type === "engine_status") {
      if (data.status === "unavailable") {
        setStatus($("runners-status"), `The Docker engine is unavailable: ${data.error ?? data.code ?? ""}`, "error");
      } else {
        setStatus($("runners-status"), "");
      }
    } else {
      return;
    }
    this.renderRunners();
  }

  renderRunners() {
    const runners = [...this.runners.values()].sort((a, b) => String(a.name).localeCompare(String(b.name)));
    const rows = runners.map((runner) => {
      const row = el("tr");
      row.dataset.runnerId = String(runner.id);
      const open = el("button", "link", runner.name || String(runner.id).slice(0, 12));
      open.type = "button";
      open.title = "show the live log";
      open.addEventListener("click", () => this.log.open(runner));
      const name = el("td");
      name.append(open);
      const status = el("span", "status", runner.status);
      status.dataset.status = String(runner.status);
      const statusCell = el("td");
      statusCell.append(status);
      const actions = el("td", "actions");
      if (this.canControl) {
        const stop = el("button", "stop", "Stop");
        stop.type = "button";
        stop.disabled = runner.status !== "running" && runner.status !== "restarting" && runner.status !== "paused";
        stop.addEventListener("click", () => this.command("runner_stop", runner));
        const remove = el("button", "delete danger", "Delete");
        remove.type = "button";
        remove.addEventListener("click", () => this.command("runner_delete", runner));
        actions.append(stop, remove);
      }
      row.append(name, statusCell, el("td", "", runner.image ?? ""), el("td", "mono", String(runner.id).slice(0, 12)), actions);
      return row;
    });
    $("runners").replaceChildren(...rows);
    this.markSelected();
  }

  markSelected() {
    const selected = $("log-panel").hidden ? null : this.log.runner?.id;
    for (const row of $("runners").rows) row.classList.toggle("selected", row.dataset.runnerId === selected);
  }

  /** runner_stop / runner_delete (docs/docker.md), after the person confirms. */
  async command(type, runner) {
    const name = runner.name || runner.id;
    const running = runner.status === "running";
    const question = type === "runner_stop"
      ? `Stop runner ${name}?\n\nIt gets SIGTERM, then SIGKILL after 10 s.`
      : `Delete runner ${name}?${running ? "\n\nIt is running: it will be killed first." : ""}\n\nThe container is removed; this cannot be undone.`;
    if (!confirm(question)) return;
    const request = { type, runner: runner.id };
    if (type === "runner_delete" && running) request.force = true;
    const result = $("runner-result");
    setStatus(result, `${type === "runner_stop" ? "stopping" : "deleting"} ${name}…`);
    try {
      const reply = await this.client.request(request, { timeoutMs: 30000 });
      if (!this.closed) setStatus(result, `${reply.name ?? name}: ${reply.type === "runner_stopped" ? "stopped" : "deleted"}`);
    } catch (error) {
      if (!this.closed) setStatus(result, `${name}: ${explain(error, "the runners:delete permission")}`, "error");
    }
  }
}

// -- the page ------------------------------------------------------------------------

function notice(text, kind = "info", auth = false) {
  const node = $("notice");
  node.textContent = text;
  node.hidden = text === "";
  node.dataset.kind = kind;
  if (auth) node.dataset.auth = "1"; else delete node.dataset.auth;
}

let session = null;

function begin(token) {
  // The old session stops updating the page at once; its client closes on its own.
  session?.close();
  session = new Session(token);
  session.run();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("token-input");
  const token = input.value.trim();
  input.value = "";
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  notice("");
  begin(token);
});

$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  notice("");
  begin(null);
});

begin(tokenFromAddress());
