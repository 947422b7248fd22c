// The gateway status page: polls /api/status and redraws; no external assets.
"use strict";

const REFRESH_MS = 1500;
const EVENTS_KEPT = 60;
let lastSeq = 0;
let events = [];
let previous = null; // {time, counters: {key: traffic}} from the last refresh
let refreshes = 0;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function cellState(cell) {
  if (!cell || !cell.endpoints) return "none";
  if (cell.healthy === cell.endpoints) return "healthy";
  if (cell.healthy === 0) return "down";
  return "degraded";
}

function fmtTime(t) {
  return new Date(t * 1000).toLocaleTimeString([], {hour12: false});
}

function liveShares(status) {
  // Share of new connections (and HTTP requests) per cluster since the last refresh.
  const counters = {};
  for (const svc of status.services) {
    for (const [cluster, cell] of Object.entries(svc.clusters)) {
      counters[`${svc.service}|${svc.port}|${cluster}`] =
        (cell.connections || 0) + (cell.requests || 0);
    }
  }
  const shares = {};
  if (previous) {
    const totals = {};
    const deltas = {};
    for (const [key, n] of Object.entries(counters)) {
      const d = Math.max(0, n - (previous.counters[key] || 0));
      deltas[key] = d;
      const svcKey = key.split("|").slice(0, 2).join("|");
      totals[svcKey] = (totals[svcKey] || 0) + d;
    }
    for (const [key, d] of Object.entries(deltas)) {
      const total = totals[key.split("|").slice(0, 2).join("|")];
      shares[key] = total ? {pct: 100 * d / total, n: d} : null;
    }
  }
  previous = {time: status.time, counters};
  return shares;
}

function renderSummary(status) {
  const g = status.gateway;
  document.getElementById("cluster").textContent = g.cluster_id;
  const ready = g.ready ? el("span", {class: "ok"}, "ready") : el("span", {class: "bad"}, "NOT READY");
  const panics = status.services.filter((s) => s.panic).length;
  const summary = document.getElementById("summary");
  summary.replaceChildren(
    ready, ` · snapshot v${g.snapshot_version}`,
    g.snapshot_age_s !== null ? ` (${Math.round(g.snapshot_age_s)} s old)` : "",
    ` · ${g.services} services · ${status.clusters.length} clusters · `,
    `${g.active_connections} open connections`,
    g.workers > 1 ? ` · ${g.workers} proxy processes` : "",
    g.health_scope ? el("div", {class: "scope"}, g.health_scope) : "",
    panics ? el("span", {class: "bad"}, ` · ${panics} in panic`) : "",
  );
}

function renderMatrix(status, shares) {
  const local = status.gateway.cluster_id;
  const head = el("tr", {}, el("th", {}, "service"));
  for (const c of status.clusters) {
    head.append(el("th", {class: c === local ? "local" : "", "data-cluster": c}, c));
  }
  const body = [];
  for (const svc of status.services) {
    const label = `${svc.service}:${svc.port}/${svc.protocol}`;
    const meta = [svc.headless ? "headless" : (svc.ips.join(", ") || "no IP"),
                  svc.headless ? null : svc.locality,
                  svc.app_protocol].filter(Boolean).join(" · ");
    const row = el("tr", {"data-service": svc.service, "data-port": svc.port},
      el("td", {class: "svc"}, el("div", {class: "name"}, label),
         el("div", {class: "meta"}, meta),
         svc.panic ? el("div", {class: "panic"}, "PANIC: balancing over unhealthy endpoints")
                   : null));
    for (const c of status.clusters) {
      const cell = svc.clusters[c];
      const state = cellState(cell);
      const td = el("td", {class: "cell", "data-service": svc.service, "data-port": svc.port,
                           "data-cluster": c, "data-state": state});
      if (cell && cell.endpoints) {
        const bad = cell.ejected ? ` · ${cell.ejected} ejected` : "";
        td.append(el("span", {class: `badge state-${state}`},
                     `${cell.healthy}/${cell.endpoints} healthy`), bad);
        const share = shares[`${svc.service}|${svc.port}|${c}`];
        const nums = [];
        if (cell.expected_share !== undefined) nums.push(`expected ${cell.expected_share}%`);
        if (share) nums.push(`live ${share.pct.toFixed(0)}%`);
        if (cell.connections || cell.requests) {
          nums.push(`${(cell.connections || 0) + (cell.requests || 0)} total`);
        }
        if (cell.active) nums.push(`${cell.active} open`);
        if (cell.failed) nums.push(`${cell.failed} failed`);
        td.append(el("div", {class: "nums"}, nums.join(" · ") || "no traffic yet"));
        const pct = share ? share.pct : (cell.expected_share || 0);
        td.append(el("div", {class: "bar", title: share ? "live share" : "expected share"},
                     el("span", {"data-pct": pct.toFixed(1)})));
      } else {
        td.append(el("span", {class: "badge state-none"}, "—"));
      }
      row.append(td);
    }
    body.push(row);
  }
  for (const row of body) {
    for (const bar of row.querySelectorAll(".bar > span")) bar.style.width = `${bar.dataset.pct}%`;
  }
  const table = document.getElementById("matrix");
  table.tHead.replaceChildren(head);
  table.tBodies[0].replaceChildren(...body);
}

function renderEvents(status) {
  if (status.events_seq < lastSeq) {
    // A restarted gateway numbers its events from 1 again: those kept are another
    // process's, and filtering by the old number hid every new one.
    lastSeq = 0;
    events = [];
  }
  for (const e of status.events) {
    if (e.seq > lastSeq) { events.push(e); lastSeq = e.seq; }
  }
  events = events.slice(-EVENTS_KEPT);
  const list = document.getElementById("events");
  list.replaceChildren(...events.slice().reverse().map((e) =>
    el("li", {"data-kind": e.kind},
       el("span", {class: "t"}, fmtTime(e.time)),
       el("span", {class: `k k-${e.kind}`}, e.kind),
       `${e.subject}: ${e.text}`)));
  if (!events.length) list.replaceChildren(el("li", {}, "no events yet"));
}

function renderSources(status) {
  const items = Object.entries(status.sources).map(([name, s]) =>
    el("li", {}, `${name}: ${s.connected ? "connected" : "DISCONNECTED"}, ` +
       `${s.synced ? "synced" : "not synced"}, ${s.objects} objects` +
       (s.error ? ` — error: ${s.error}` : "")));
  document.getElementById("sources").replaceChildren(...items);
}

async function demoAction(name, action) {
  await fetch(`/demo/clusters/${encodeURIComponent(name)}/${action}`, {method: "POST"});
  await refreshDemo();
}

async function refreshDemo() {
  const resp = await fetch("/demo/clusters");
  if (!resp.ok) return;
  const clusters = await resp.json();
  const box = document.getElementById("demo-clusters");
  box.replaceChildren(...Object.entries(clusters).map(([name, c]) => {
    const killed = c.backends === "killed";
    const button = el("button", {type: "button", "data-cluster": name},
                      killed ? "restore" : "kill");
    button.addEventListener("click", () => demoAction(name, killed ? "restore" : "kill"));
    return el("div", {class: "demo-cluster"}, el("strong", {}, name),
              ` backends ${c.backends}`, button);
  }));
  document.getElementById("demo").hidden = false;
}

async function refresh() {
  const updated = document.getElementById("updated");
  try {
    const resp = await fetch(`/api/status?since=${lastSeq}`, {cache: "no-store"});
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const status = await resp.json();
    const shares = liveShares(status);
    renderSummary(status);
    renderMatrix(status, shares);
    renderEvents(status);
    renderSources(status);
    if (status.demo_control) await refreshDemo();
    refreshes += 1;
    updated.dataset.refreshes = String(refreshes);
    updated.textContent = `updated ${fmtTime(status.time)} · refreshes every ` +
      `${REFRESH_MS / 1000} s`;
  } catch (err) {
    updated.textContent = `cannot reach the gateway (${err.message}); retrying…`;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
