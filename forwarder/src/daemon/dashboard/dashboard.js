// weir's dashboard: polls /api/dashboard every second and draws every pool, every server
// with its admin and health state, rates from the difference of two polls, small charts of
// the last five minutes this page has seen, and the event feed. No dependencies: it is
// embedded in the daemon and must work on a host without internet.
"use strict";

const POLL_MS = 1000;
const HISTORY = 300; // samples: five minutes at one per second

// Per series key: the previous counters and the rate history.
const series = new Map();

function rate(key, counters, now) {
  let s = series.get(key);
  if (!s) {
    s = { last: null, at: 0, rates: [], errors: [] };
    series.set(key, s);
  }
  let r = null, e = null;
  if (s.last) {
    const secs = (now - s.at) / 1000;
    if (secs > 0) {
      // A counter that went down (a server re-added) restarts from zero.
      r = Math.max(0, counters.value - s.last.value) / secs;
      e = Math.max(0, counters.errors - s.last.errors) / secs;
    }
  }
  s.last = counters;
  s.at = now;
  if (r !== null) {
    s.rates.push(r);
    s.errors.push(e);
    if (s.rates.length > HISTORY) { s.rates.shift(); s.errors.shift(); }
  }
  return { rate: r, errors: e, history: s };
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

// A polyline chart of `lines` ([values, class]) scaled to their common maximum.
function chart(cls, width, height, lines) {
  const box = svg("svg", { class: cls, viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" });
  const max = Math.max(1e-9, ...lines.flatMap(([v]) => v));
  for (const [values, lineClass] of lines) {
    // An all-zero error line is left out; the time axis spans at least a minute.
    if (values.length < 2 || (lineClass && !values.some((v) => v > 0))) continue;
    const step = width / (Math.min(HISTORY, Math.max(60, values.length)) - 1);
    const x0 = width - step * (values.length - 1);
    const points = values.map((v, i) => `${(x0 + i * step).toFixed(1)},${(height - 1 - (v / max) * (height - 2)).toFixed(1)}`);
    box.append(svg("polyline", { points: points.join(" "), class: lineClass || "" }));
  }
  return box;
}

function fmt(n) {
  if (n === null || n === undefined) return "…";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(0) + "k";
  if (n >= 100) return n.toFixed(0);
  return n.toFixed(1);
}

function badge(text) {
  return el("span", { class: `badge ${text}` }, text);
}

function serverCounters(s) {
  if (s.l7) {
    return { value: s.l7.requests, errors: s.l7.failures + s.l7.responses[4] };
  }
  return { value: s.traffic.packets, errors: 0 };
}

function renderPools(data, now) {
  const pools = new Map();
  for (const s of data.servers) {
    if (!pools.has(s.vip)) pools.set(s.vip, []);
    pools.get(s.vip).push(s);
  }
  const vips = new Map(data.vips.map((v) => [v.name, v]));
  const out = [];
  for (const [name, servers] of pools) {
    const l7 = servers.some((s) => s.l7);
    const vip = vips.get(name);
    const total = { value: 0, errors: 0 };
    const rows = servers.map((s) => {
      const c = serverCounters(s);
      total.value += c.value;
      total.errors += c.errors;
      const r = rate(`${name}|${s.address}`, c, now);
      const active = l7 ? s.l7.in_flight : s.active_flows;
      const row = el("tr", {
        "data-pool": name,
        "data-server": s.address,
        "data-admin": s.admin,
        "data-health": s.health,
      },
        el("td", {}, s.address),
        el("td", {}, badge(s.admin)),
        el("td", { title: s.health_reason || s.last_check || "" }, badge(s.health)),
        el("td", { class: "num" }, s.weight),
        el("td", { class: "num" }, fmt(r.rate)),
        el("td", { class: "num" }, l7 ? fmt(r.errors) : "–"),
        el("td", { class: "num" }, active),
        el("td", {}, chart("spark", 140, 24, [[r.history.rates], [r.history.errors, "errors"]])),
      );
      return row;
    });
    const poolRate = rate(`pool|${name}`, total, now);
    const where = vip ? `${vip.address} ${vip.protocol} ${vip.mode}` : "vhost";
    const head = el("div", { class: "pool-head" },
      el("div", {},
        el("h2", {}, name, el("span", { class: "kind" }, l7 ? "L7" : "L4")),
        el("div", { class: "muted" }, `${where} · ${servers.filter((s) => s.admin === "ready").length}/${servers.length} ready · ${fmt(poolRate.rate)} ${l7 ? "req/s" : "pkt/s"}`),
      ),
      chart("chart", 260, 44, [[poolRate.history.rates], [poolRate.history.errors, "errors"]]),
    );
    const table = el("table", {},
      el("thead", {}, el("tr", {},
        el("th", {}, "server"), el("th", {}, "admin"), el("th", {}, "health"),
        el("th", { class: "num" }, "weight"),
        el("th", { class: "num" }, l7 ? "req/s" : "pkt/s"),
        el("th", { class: "num" }, "err/s"),
        el("th", { class: "num" }, l7 ? "in flight" : "flows"),
        el("th", {}, "recent"))),
      el("tbody", {}, ...rows));
    out.push(el("article", { class: "pool", "data-pool": name }, head, table));
  }
  document.getElementById("pools").replaceChildren(...out);
}

function renderOverview(data, now) {
  const st = data.status;
  const sum = (pred) => st.counters.filter(pred).reduce((a, c) => a + c.packets, 0);
  const forwarded = rate("dp|forwarded", { value: sum((c) => c.reason.startsWith("forward")), errors: 0 }, now);
  const dropped = rate("dp|dropped", { value: sum((c) => c.reason.startsWith("drop")), errors: 0 }, now);
  const requests = rate("l7|requests", { value: st.listeners.reduce((a, l) => a + l.requests, 0), errors: 0 }, now);
  const refused = st.listeners.reduce((a, l) => a + (l.refusals || []).reduce((b, r) => b + r.count, 0), 0);
  const open = st.listeners.reduce((a, l) => a + (l.open_connections || 0), 0);
  const card = (label, value) => el("div", { class: "card" }, el("div", { class: "muted" }, label), el("div", { class: "value" }, value));
  const node = st.daemon.node || {};
  const nodeText = node.drained ? "drained" : "in service";
  const bgp = node.speaker
    ? (node.speaker_error ? "speaker unreachable" : `${(node.sessions || []).filter((s) => s.info === "Established").length}/${(node.sessions || []).length} sessions, ${(node.announced || []).length} announced`)
    : "BGP off";
  document.getElementById("overview").replaceChildren(
    el("div", { class: "card", id: "node" }, el("div", { class: "muted" }, "node"), el("div", { class: "value" }, nodeText), el("div", { class: "muted" }, bgp)),
    card("forwarded pkt/s", fmt(forwarded.rate)),
    card("dropped pkt/s", fmt(dropped.rate)),
    card("embryonic flows", st.flows.embryonic),
    card("L7 req/s", fmt(requests.rate)),
    card("L7 open connections", open),
    card("L7 refused (total)", refused),
  );
  const d = st.daemon;
  const reload = d.reloads.last_succeeded === false ? " · last reload refused" : "";
  document.getElementById("daemon").textContent = `v${d.version} · pid ${d.pid} · up ${Math.floor(d.uptime_secs / 60)} min${reload}`;
}

function renderEvents(events) {
  const items = events.slice().reverse().map((e) =>
    el("li", {}, el("time", {}, new Date(e.unix_ms).toISOString().slice(11, 19)), e.text));
  document.getElementById("events").replaceChildren(...items);
}

async function poll() {
  const now = Date.now();
  try {
    const response = await fetch("/api/dashboard", { cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
    const data = await response.json();
    renderOverview(data, now);
    renderPools(data, now);
    renderEvents(data.events);
    const updated = document.getElementById("updated");
    updated.className = "muted";
    updated.textContent = `updated ${new Date(now).toISOString().slice(11, 19)} UTC`;
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (err) {
    const updated = document.getElementById("updated");
    updated.className = "error";
    updated.textContent = `cannot reach the daemon: ${err.message}`;
  }
  setTimeout(poll, Math.max(0, POLL_MS - (Date.now() - now)));
}

poll();
