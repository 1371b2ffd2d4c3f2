// ORBION monitor dashboard: polls the monitor's JSON API and draws everything by hand (SVG, no library).
"use strict";
(function () {
  const REFRESH_MS = 2000;
  const STAGES = ["gateway", "queue", "conversation", "llm", "send"];
  const $ = (id) => document.getElementById(id);
  const errors = [];
  window.addEventListener("error", (e) => { errors.push(String(e.message)); showErrors(); });
  window.addEventListener("unhandledrejection", (e) => { errors.push(String(e.reason)); showErrors(); });
  function showErrors() { const box = $("js-errors"); box.textContent = errors.join("\n"); box.hidden = errors.length === 0; }

  function apiKey() {
    const fromHash = new URLSearchParams(location.hash.slice(1)).get("key");
    if (fromHash) localStorage.setItem("orbion.apiKey", fromHash);
    return localStorage.getItem("orbion.apiKey") || "";
  }
  $("keyform").addEventListener("submit", (e) => {
    e.preventDefault(); localStorage.setItem("orbion.apiKey", $("apikey").value); $("keyform").hidden = true; tick();
  });

  async function get(path) {
    const headers = {}; const key = apiKey(); if (key) headers["X-API-Key"] = key;
    const res = await fetch(path, { headers, cache: "no-store" });
    if (res.status === 401) { $("keyform").hidden = false; throw new Error("unauthorized"); }
    if (!res.ok && res.status !== 503) throw new Error(path + " HTTP " + res.status);
    return res.json();
  }

  const fmtSec = (s) => s == null ? "–" : s < 1 ? Math.round(s * 1000) + " ms" : s.toFixed(2) + " s";
  const fmtPct = (r) => r == null ? "–" : (r * 100).toFixed(r < 0.1 ? 2 : 1) + "%";
  const fmtNum = (n) => n == null ? "–" : n >= 100 ? Math.round(n).toLocaleString("en") : (Math.round(n * 10) / 10).toString();
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text != null) node.textContent = text;
    return node;
  }
  function svgEl(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  }
  function rows(tableId, data) {
    const body = $(tableId).tBodies[0] || $(tableId).appendChild(el("tbody"));
    body.replaceChildren(...data.map((cells) => {
      const tr = el("tr");
      for (const c of cells) { const td = el("td"); if (c instanceof Node) td.appendChild(c); else td.textContent = c; tr.appendChild(td); }
      return tr;
    }));
  }
  function status(name, state) {
    const span = el("span"); span.appendChild(el("span", { class: "dot " + state })); span.appendChild(document.createTextNode(name)); return span;
  }

  const W = 600, H = 130, PAD_L = 38, PAD_B = 16, PAD_T = 8;
  function axes(svg, maxY, fmt) {
    svg.appendChild(svgEl("line", { class: "axis", x1: PAD_L, y1: H - PAD_B, x2: W, y2: H - PAD_B }));
    for (const f of [0.5, 1]) {
      const y = H - PAD_B - f * (H - PAD_B - PAD_T);
      svg.appendChild(svgEl("line", { class: "axis", x1: PAD_L, y1: y, x2: W, y2: y, "stroke-dasharray": "3 3" }));
      const t = svgEl("text", { x: 2, y: y + 4 }); t.textContent = fmt(maxY * f); svg.appendChild(t);
    }
  }
  function polyline(svg, series, maxY, cls) {
    const n = series.length; if (n === 0) return;
    const step = (W - PAD_L) / Math.max(1, n - 1);
    const pts = [];
    series.forEach((v, i) => { if (v != null) pts.push((PAD_L + i * step).toFixed(1) + "," + (H - PAD_B - (v / maxY) * (H - PAD_B - PAD_T)).toFixed(1)); });
    if (pts.length) svg.appendChild(svgEl("polyline", { class: "line " + cls, points: pts.join(" ") }));
    // A lone point (the first window with traffic) draws no line: mark it.
    if (pts.length === 1) { const [x, y] = pts[0].split(","); svg.appendChild(svgEl("circle", { class: "dotpt " + cls, cx: x, cy: y, r: 3 })); }
  }
  function drawMessages(series) {
    const svg = $("chart-messages"); svg.replaceChildren();
    const maxY = Math.max(1, ...series.map((p) => Math.max(p.messages, p.webhooks)));
    axes(svg, maxY, (v) => fmtNum(v));
    const n = series.length, bw = (W - PAD_L) / Math.max(1, n);
    series.forEach((p, i) => {
      const h = (p.messages / maxY) * (H - PAD_B - PAD_T);
      if (h > 0) svg.appendChild(svgEl("rect", { class: "bar", x: PAD_L + i * bw + 1, y: H - PAD_B - h, width: Math.max(1, bw - 2), height: h }));
    });
    polyline(svg, series.map((p) => p.webhooks), maxY, "webhooks");
    svg.dataset.points = String(series.reduce((a, p) => a + p.messages, 0));
  }
  function drawLatency(series) {
    const svg = $("chart-latency"); svg.replaceChildren();
    const maxY = Math.max(0.1, ...series.map((p) => p.p99 || 0));
    axes(svg, maxY, fmtSec);
    for (const q of ["p50", "p95", "p99"]) polyline(svg, series.map((p) => p[q]), maxY, q);
  }

  function render(m, alerts, traces) {
    const health = m.health || {};
    const badge = $("overall"); badge.className = "badge " + health.status; badge.textContent = health.status; badge.dataset.status = health.status;
    $("reasons").textContent = (health.reasons || []).join(" · ");
    $("reasons").title = (health.reasons || []).join("\n");
    $("kpi-messages").textContent = fmtNum(m.messages.per_minute);
    $("kpi-messages").dataset.value = String(m.messages.per_minute);
    $("kpi-webhooks").textContent = fmtNum(m.messages.webhooks_per_minute) + " webhooks/min · " + m.messages.processed_total + " replied in total";
    const e = m.end_to_end;
    $("kpi-e2e").textContent = e.count ? [e.p50, e.p95, e.p99].map(fmtSec).join(" / ") : "–";
    $("kpi-e2e-count").textContent = e.count + " messages in the last " + m.recent_seconds + " s";
    $("kpi-errors").textContent = fmtPct(m.error_ratio);
    $("kpi-spans").textContent = fmtNum(m.spans.per_second) + " spans/s · " + m.spans.spans_total.toLocaleString("en") + " total";
    const caches = Object.entries(m.cache || {});
    $("kpi-cache").textContent = caches.length ? caches.map(([, c]) => fmtPct(c.hit_ratio != null ? c.hit_ratio : c.hit_ratio_total)).join(" / ") : "–";
    $("kpi-cache-sub").textContent = caches.map(([s]) => s).join(" / ");
    $("kpi-refusals").textContent = fmtNum(m.rate_limit_refusals_total);
    $("kpi-dlq").textContent = "dead letters: " + (m.dead_letters == null ? "–" : m.dead_letters);

    drawMessages(m.series); drawLatency(m.series);

    rows("services", Object.entries(health.services || {}).map(([n, s]) => [status(n, s.status), s.ready ? "ready" : "not ready", s.latency_ms == null ? "" : s.latency_ms + " ms"]));
    rows("deps", Object.entries(health.dependencies || {}).map(([n, st]) => [status(n, st), st]));
    const breakers = Object.entries(m.breakers || {});
    rows("breakers", breakers.length ? breakers.map(([n, b]) => [status(n, b.state), b.state.replace("_", "-"), b.service || ""]) : [["none reported"]]);
    const lag = Object.entries(m.consumer_lag || {});
    rows("lag", lag.length ? lag.map(([n, v]) => [n, String(v)]) : [["no consumers"]]);

    const list = $("alerts"); list.replaceChildren();
    const active = [...alerts.firing, ...alerts.pending];
    if (!active.length) list.appendChild(el("li", { class: "none" }, "no active alerts"));
    for (const a of active) list.appendChild(el("li", { class: a.state }, a.state.toUpperCase() + " " + a.name + (a.instance ? " [" + a.instance + "]" : "") + " — " + a.summary));

    const stages = $("stages"); stages.replaceChildren();
    for (const s of STAGES) {
      const st = (m.stages || {})[s] || {};
      const row = el("div"); row.appendChild(el("span", { class: "dot s-" + s })); row.appendChild(document.createTextNode(s + ": " + fmtSec(st.p95)));
      stages.appendChild(row);
    }

    rows("traces", traces.traces.length ? traces.traces.map((t) => {
      const bar = el("div", { class: "stagebar", title: STAGES.map((s) => s + " " + fmtSec(t.stages[s])).join(", ") });
      for (const s of STAGES) {
        const part = (t.stages[s] || 0) / Math.max(1e-9, t.end_to_end_seconds);
        if (part > 0) bar.appendChild(el("span", { class: "s-" + s, style: "width:" + (part * 100).toFixed(2) + "%" }));
      }
      const link = el("a", { class: "mono", href: "/api/traces/" + t.trace_id, target: "_blank" }, t.trace_id);
      return [link, fmtSec(t.end_to_end_seconds), bar];
    }) : [["no completed messages yet"]]);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }

  let busy = false;
  async function tick() {
    if (busy) return; busy = true;
    try {
      const [m, alerts, traces] = await Promise.all([get("/api/metrics"), get("/api/alerts"), get("/api/traces/recent?slowest=8")]);
      render(m, alerts, traces);
    } catch (err) {
      $("updated").textContent = "update failed: " + err.message;
    } finally { busy = false; }
  }
  tick();
  setInterval(tick, REFRESH_MS);
})();
