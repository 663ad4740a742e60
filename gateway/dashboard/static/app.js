// The operators' dashboard: one page over the gateway's own API (docs/dashboard.md).
// Data comes from /api/v1 with the operator's bearer token; live changes come from the SSE stream.
"use strict";

const t = (key, vars) => I18N.t(key, vars);
const $ = (id) => document.getElementById(id);
const BOARD_STATES = ["submitted", "triaged", "planned", "assigned", "in_service", "completed", "evaluated"];
const CARDS_PER_COLUMN = 30;

const app = {
  token: null,
  catalogue: { groups: {}, services: {}, providers: {} },
  devices: new Map(),    // device_id -> device (presence kept live)
  alarms: new Map(),     // event id -> open alarm
  requests: new Map(),   // ticket -> request (kept live)
  tab: "overview",
  chart: null,
  timers: [],
  stream: null,          // AbortController of the live stream
};

// -- the API ------------------------------------------------------------------------------------

// Event ids are 64-bit integers, beyond what a JavaScript number holds exactly: keep the digits
// of any such number as a string (JSON.parse source text access).
function parseJson(text) {
  return JSON.parse(text, (key, value, context) =>
    typeof value === "number" && !Number.isSafeInteger(value) && Number.isInteger(value) && context?.source
      ? context.source : value);
}

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${app.token}` };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    if (response.status === 401) signOut(t("bad_token"));
    throw new ApiError(response.status, detail);
  }
  return parseJson(await response.text());
}

function showError(error) {
  const text = error instanceof ApiError && error.status === 403 ? t("forbidden") : String(error.message || error);
  $("message").textContent = text;
}

// -- the live stream ----------------------------------------------------------------------------
// EventSource cannot send an Authorization header, and a token in the URL would end up in logs;
// so the stream is read with fetch and parsed here (the SSE format is a few lines of text).

async function live() {
  const controller = new AbortController();
  app.stream = controller;
  while (!controller.signal.aborted) {
    try {
      const response = await fetch("/api/v1/stream", {
        headers: { Authorization: `Bearer ${app.token}` }, signal: controller.signal,
      });
      if (response.status === 401) { signOut(t("bad_token")); return; }
      if (!response.ok) throw new Error(response.statusText);
      setLive(true);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          dispatch(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (_) { /* reconnect below */ }
    setLive(false);
    if (!controller.signal.aborted) await new Promise((r) => setTimeout(r, 2000));
  }
}

function dispatch(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return;  // a comment (keep-alive)
  const payload = parseJson(data.join("\n"));
  ({ alarm: onAlarm, ack: onAck, presence: onPresence, request: onRequest, vote: onVote })[name]?.(payload);
}

function setLive(on) {
  $("live").classList.toggle("on", on);
  $("live").classList.toggle("off", !on);
  $("live-text").textContent = t(on ? "online" : "offline");
  $("live").dataset.state = on ? "online" : "offline";
}

// A list fetched from the API may predate a live change that arrived while it was on its way:
// live changes are kept for a while, and each load applies again those that came during it.
const liveChanges = [];  // [number, apply]
let liveCount = 0;

function liveChange(apply) {
  apply();
  liveChanges.push([++liveCount, apply]);
  if (liveChanges.length > 1000) liveChanges.splice(0, liveChanges.length - 1000);
}

function replayLive(since) {
  for (const [n, apply] of liveChanges) if (n > since) apply();
}

function onAlarm(alarm) {
  liveChange(() => app.alarms.set(String(alarm.id), { ...alarm, fresh: true }));
  renderAlarms();
  renderOverview();
}

function onAck(ack) {
  liveChange(() => app.alarms.delete(String(ack.id)));
  renderAlarms();
  renderOverview();
}

function onPresence(change) {
  liveChange(() => {
    const device = app.devices.get(change.device_id);
    if (device) device.online = change.online;
    else app.devices.set(change.device_id, { device_id: change.device_id, kind: change.kind, building: change.building, floor: null, online: change.online, last_values: {} });
  });
  later("overview", renderOverview);
}

function onRequest(request) {
  liveChange(() => {
    const listed = app.requests.get(request.id);
    if (!listed || listed.updated_ms <= request.updated_ms) app.requests.set(request.id, request);
  });
  later("board", renderBoard);
}

function onVote() {
  if (app.tab === "needs") later("needs", loadNeeds);
}

// Many changes in a burst make one redraw.
const pending = new Map();
function later(key, fn) {
  if (pending.has(key)) return;
  pending.set(key, setTimeout(() => { pending.delete(key); fn(); }, 300));
}

// -- overview -----------------------------------------------------------------------------------

async function loadOverview() {
  const since = liveCount;
  const [summary, devices, alarms] = await Promise.all([
    api("/api/v1/summary"), api("/api/v1/devices?limit=10000"), api("/api/v1/alarms?limit=1000"),
  ]);
  $("community").textContent = summary.community;
  app.devices = new Map(devices.items.map((d) => [d.device_id, d]));
  app.alarms = new Map(alarms.items.filter((a) => !a.acked).map((a) => [String(a.id), a]));
  replayLive(since);
  renderOverview();
  renderAlarms();
  fillDeviceSelect();
}

function buildingLabel(building) {
  if (building === "station") return t("station");
  return building ? t("building_n", { n: building }) : "—";
}

function renderOverview() {
  const devices = [...app.devices.values()];
  const online = devices.filter((d) => d.online).length;
  const open = [...app.requests.values()].filter((r) => r.status === "open").length;
  $("summary-cards").innerHTML = "";
  for (const [value, label, id] of [
    [devices.length, t("devices"), "card-devices"], [online, t("devices_online"), "card-online"],
    [app.alarms.size, t("open_alarms_card"), "card-alarms"], [open, t("open_requests"), "card-requests"],
  ]) {
    const card = el("div", { class: "card", id });
    card.append(el("div", { class: "n" }, String(value)), el("div", { class: "l" }, label));
    $("summary-cards").append(card);
  }
  const alarmed = new Set([...app.alarms.values()].map((a) => a.device_id));
  const byBuilding = new Map();
  for (const d of devices) {
    const b = d.building || "";
    if (!byBuilding.has(b)) byBuilding.set(b, new Map());
    const floors = byBuilding.get(b);
    const floor = d.floor ?? "";
    if (!floors.has(floor)) floors.set(floor, []);
    floors.get(floor).push(d);
  }
  const container = $("buildings");
  container.innerHTML = "";
  const order = [...byBuilding.keys()].sort((a, b) => naturalCompare(a, b));
  for (const building of order) {
    const box = el("div", { class: "building", "data-building": building });
    box.append(el("h3", {}, buildingLabel(building)));
    const floors = byBuilding.get(building);
    const floorOrder = [...floors.keys()].sort((a, b) => (b === "" ? -1 : a === "" ? 1 : b - a));
    for (const floor of floorOrder) {
      const row = el("div", { class: "floor" });
      row.append(el("span", { class: "label" }, floor === "" ? t("whole_building") : `${floor}F`));
      for (const d of floors.get(floor).sort((x, y) => x.device_id.localeCompare(y.device_id))) {
        const state = alarmed.has(d.device_id) ? "alarm" : d.online ? "online" : "offline";
        row.append(el("span", {
          class: `dev ${state}`, title: `${d.device_id} · ${t("kind_" + d.kind)} · ${state}`,
          "data-device": d.device_id, "data-state": state,
        }));
      }
      box.append(row);
    }
    container.append(box);
  }
}

// -- alarms -------------------------------------------------------------------------------------

function renderAlarms() {
  const rows = $("alarm-rows");
  rows.innerHTML = "";
  const alarms = [...app.alarms.values()].sort((a, b) => b.ts_ms - a.ts_ms);
  for (const alarm of alarms) {
    const tr = el("tr", { class: `${alarm.severity}${alarm.fresh ? " fresh" : ""}`, "data-alarm": String(alarm.id) });
    alarm.fresh = false;
    const button = el("button", { type: "button", class: "ack" }, t("ack"));
    button.addEventListener("click", () => acknowledge(alarm.id, button));
    tr.append(
      el("td", {}, when(alarm.ts_ms)), el("td", {}, t(alarm.severity)), el("td", {}, alarm.device_id),
      el("td", {}, buildingLabel(alarm.building)), el("td", {}, alarm.type), el("td", {}, alarm.message || ""),
      el("td", {}, button),
    );
    rows.append(tr);
  }
  $("no-alarms").hidden = alarms.length > 0;
  $("alarm-count").textContent = String(alarms.length);
}

async function acknowledge(id, button) {
  button.disabled = true;
  try {
    await api(`/api/v1/events/${id}/ack`, { method: "POST", body: JSON.stringify({ note: "dashboard" }) });
    onAck({ id });
  } catch (error) {
    button.disabled = false;
    showError(error);
  }
}

// -- telemetry ----------------------------------------------------------------------------------

function fillDeviceSelect() {
  const select = $("tm-device");
  const chosen = select.value;
  select.innerHTML = "";
  const ids = [...app.devices.values()].filter((d) => Object.keys(d.last_values || {}).length)
    .map((d) => d.device_id).sort(naturalCompare);
  for (const id of ids) select.append(el("option", { value: id }, `${id} (${t("kind_" + app.devices.get(id).kind)})`));
  if (ids.includes(chosen)) select.value = chosen;
  fillMetricSelect();
}

function fillMetricSelect() {
  const select = $("tm-metric");
  const chosen = select.value;
  const device = app.devices.get($("tm-device").value);
  select.innerHTML = "";
  for (const m of Object.keys(device?.last_values || {}).sort()) select.append(el("option", { value: m }, m));
  if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
}

async function loadTelemetry() {
  const device = $("tm-device").value;
  const metric = $("tm-metric").value;
  if (!device || !metric) return;
  const hours = { "1h": 1, "6h": 6, "24h": 24 }[$("tm-range").value];
  const start = new Date(Date.now() - hours * 3600_000).toISOString();
  const step = hours > 1 ? `&step=${hours}m` : "";  // about 60 buckets: one per `hours` minutes
  const data = await api(`/api/v1/devices/${encodeURIComponent(device)}/telemetry?metric=${encodeURIComponent(metric)}&start=${start}${step}`);
  const points = data.series[metric] || [];
  const xs = points.map((p) => p.ts_ms / 1000);
  const ys = points.map((p) => p.value ?? p.avg);
  $("chart-empty").hidden = points.length > 0;
  const box = $("chart");
  if (app.chart) { app.chart.destroy(); app.chart = null; }
  box.dataset.points = String(points.length);
  if (!points.length) return;
  app.chart = new uPlot({
    width: Math.max(320, box.clientWidth - 16), height: 320,
    // The time axis and legend in the page's one date format (`when`), not uPlot's US default.
    series: [
      { label: t("time"), value: (u, v) => (v == null ? "—" : when(v * 1000)) },
      { label: `${device} · ${metric}`, stroke: "#2563eb", width: 2, points: { show: points.length < 60 } },
    ],
    axes: [{ space: 80, values: (u, splits) => splits.map((s) => clock(s * 1000, splits[1] - splits[0] < 60)) }, { size: 60 }],
  }, [xs, ys], box);
}

// -- service requests ---------------------------------------------------------------------------

async function loadRequests() {
  const query = BOARD_STATES.map((s) => `state=${s}`).join("&");
  const since = liveCount;
  const data = await api(`/api/v1/requests?limit=1000&${query}`);
  app.requests = new Map(data.items.map((r) => [r.id, r]));
  replayLive(since);
  renderBoard();
}

function serviceName(code) {
  return I18N.name(app.catalogue.services[code], code);
}

function renderBoard() {
  const board = $("board");
  board.innerHTML = "";
  const requests = [...app.requests.values()].sort((a, b) => b.updated_ms - a.updated_ms);
  for (const state of BOARD_STATES) {
    const inState = requests.filter((r) => r.state === state);
    const column = el("div", { class: "column", "data-state": state });
    column.append(el("h3", {}, el("span", {}, t("state_" + state)), el("span", { class: "count" }, String(inState.length))));
    for (const r of inState.slice(0, CARDS_PER_COLUMN)) {
      const card = el("div", { class: `ticket${r.overdue ? " overdue" : ""}`, "data-ticket": r.id });
      card.append(
        el("div", {}, serviceName(r.service_code)),
        el("div", { class: "id" }, `${r.id} · ${buildingLabel(r.building)}`),
      );
      column.append(card);
    }
    if (inState.length > CARDS_PER_COLUMN) column.append(el("div", { class: "muted" }, t("more", { n: inState.length - CARDS_PER_COLUMN })));
    board.append(column);
  }
  later("overview", renderOverview);
}

// -- needs: heat map, ranked list, proposals ------------------------------------------------------

async function loadNeeds() {
  const [heat, needs, proposals] = await Promise.all([
    api("/api/v1/needs/heatmap"), api("/api/v1/needs?limit=20"), api("/api/v1/proposals"),
  ]);
  renderHeatmap(heat);
  const rows = $("needs-rows");
  rows.innerHTML = "";
  for (const n of needs.items) {
    rows.append(el("tr", { "data-need": n.need_id },
      el("td", {}, String(n.rank)), el("td", {}, serviceName(n.service_code)), el("td", {}, buildingLabel(n.building)),
      el("td", {}, String(n.households)), el("td", {}, n.score.toFixed(1)), el("td", { class: "muted" }, t("why_text", {
        households: I18N.count("households_n", n.households), signals: I18N.count("signals_n", n.sensor_signals),
        priority: n.priority, days: I18N.count("days_n", (Date.now() - n.oldest_ms) / 86_400_000, 1),
      }))));
  }
  const box = $("proposals");
  box.innerHTML = "";
  if (!proposals.items.length) box.append(el("p", { class: "muted" }, t("no_proposals")));
  for (const p of proposals.items) {
    const total = Object.values(p.votes).reduce((a, b) => a + b, 0);
    const item = el("div", { class: "proposal", "data-proposal": p.id });
    item.append(
      el("strong", {}, p.title), " ", el("span", { class: "muted" }, t("result_" + p.result)),
      el("div", {}, Object.entries(p.votes).map(([choice, n]) => `${choice}: ${n}`).join(" · ") + ` (${I18N.count("votes_n", total)})`),
    );
    if (p.approval !== null) {
      const bar = el("div", { class: "bar", title: `${t("approval")} ${(p.approval * 100).toFixed(0)}%` });
      bar.append(el("span", { style: { width: `${(p.approval * 100).toFixed(0)}%` } }));
      item.append(bar);
    }
    box.append(item);
  }
}

function renderHeatmap(heat) {
  const table = $("heatmap");
  table.innerHTML = "";
  const groups = Object.keys(app.catalogue.groups);
  const buildings = Object.keys(heat.buildings).sort(naturalCompare);
  const max = Math.max(1, ...buildings.flatMap((b) => Object.values(heat.buildings[b])));
  const head = el("tr", {}, el("th", {}, t("building")));
  for (const g of groups) head.append(el("th", {}, I18N.name(app.catalogue.groups[g], g)));
  table.append(head);
  for (const b of buildings) {
    const row = el("tr", {}, el("th", {}, buildingLabel(b)));
    for (const g of groups) {
      const n = heat.buildings[b][g] || 0;
      const alpha = n ? 0.12 + 0.78 * (n / max) : 0;
      row.append(el("td", { style: { background: `rgba(220, 38, 38, ${alpha.toFixed(2)})`, color: alpha > 0.55 ? "#fff" : "inherit" }, "data-cell": `${b}/${g}` }, n ? String(n) : ""));
    }
    table.append(row);
  }
}

// -- evaluation ---------------------------------------------------------------------------------

async function loadEvaluation() {
  const [byService, byProvider] = await Promise.all([
    api("/api/v1/evaluation?by=service"), api("/api/v1/evaluation?by=provider"),
  ]);
  renderEvaluation("service", byService.rows, (k) => serviceName(k));
  renderEvaluation("provider", byProvider.rows, (k) => I18N.name(app.catalogue.providers[k], k));
}

function renderEvaluation(by, rows, name) {
  const pct = (x) => (x === null || x === undefined ? "—" : `${(x * 100).toFixed(0)}%`);
  const head = $(`eval-head-${by}`);
  head.innerHTML = "";
  head.append(el("tr", {}, ...[by, "requests_col", "completion", "on_time", "satisfaction", "complaints", "median_hours"].map((k) => el("th", {}, t(k)))));
  const body = $(`eval-${by}`);
  body.innerHTML = "";
  for (const r of rows.sort((a, b) => b.requests - a.requests)) {
    body.append(el("tr", { "data-key": r.key },
      el("td", {}, name(r.key)), el("td", {}, String(r.requests)), el("td", {}, pct(r.completion_rate)),
      el("td", {}, pct(r.on_time_rate)), el("td", {}, r.satisfaction_mean === null ? "—" : r.satisfaction_mean.toFixed(2)),
      el("td", {}, pct(r.complaint_resolution_rate)),
      el("td", {}, r.median_hours_to_complete === null ? "—" : r.median_hours_to_complete.toFixed(1))));
  }
}

// -- page -----------------------------------------------------------------------------------------

const LOADERS = { overview: loadOverview, alarms: loadOverview, telemetry: loadTelemetry, requests: loadRequests, needs: loadNeeds, evaluation: loadEvaluation };

async function show(tab) {
  app.tab = tab;
  remember();
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const v of document.querySelectorAll(".view")) v.classList.toggle("active", v.id === tab);
  $("message").textContent = "";
  try { await LOADERS[tab](); } catch (error) { showError(error); }
}

async function start() {
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("views").hidden = false;
  try {
    const catalogue = await api("/api/v1/catalogue");
    app.catalogue = {
      groups: catalogue.groups,
      services: Object.fromEntries(catalogue.services.map((s) => [s.service_code, s])),
      providers: Object.fromEntries(catalogue.providers.map((p) => [p.id, p])),
    };
    await Promise.all([loadOverview(), loadRequests()]);
  } catch (error) { showError(error); return; }
  live();
  // Charts and reports are not in the live stream: they are refreshed while on screen.
  app.timers.push(setInterval(() => { if (app.tab === "telemetry") loadTelemetry().catch(showError); }, 15000));
  app.timers.push(setInterval(() => { if (app.tab === "needs") loadNeeds().catch(showError); }, 60000));
  await show(app.tab);
}

function signOut(message) {
  sessionStorage.removeItem("cgw.token");
  app.token = null;
  app.stream?.abort();
  app.timers.forEach(clearInterval);
  app.timers = [];
  $("tabs").hidden = true;
  $("views").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  // A style is set property by property: the page's content security policy refuses style attributes.
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "style") Object.assign(node.style, v); else node.setAttribute(k, v);
  }
  node.append(...children.flat());
  return node;
}

// One date format in both languages, local time: 2026-12-02 15:39:03 (and 15:39 on chart axes).
const pad = (n) => String(n).padStart(2, "0");

function when(ms) {
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${clock(ms, true)}`;
}

function clock(ms, seconds = false) {
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}${seconds ? `:${pad(d.getSeconds())}` : ""}`;
}

function naturalCompare(a, b) {
  return String(a).localeCompare(String(b), undefined, { numeric: true });
}

function relabel() {
  I18N.apply();
  $("lang").textContent = I18N.lang === "en" ? "中文" : "English";
  document.title = t("title");
  setLive($("live").dataset.state === "online");
  if (app.token) {
    renderOverview();
    renderAlarms();
    renderBoard();
    fillDeviceSelect();
    show(app.tab);
  }
}

// The address says the view and the language (#view=needs&lang=en), so either can be linked to,
// bookmarked or reloaded; the fragment never leaves the browser.
function remember() {
  history.replaceState(null, "", `${location.pathname}${location.search}#view=${app.tab}&lang=${I18N.lang}`);
}

// What a link asks for: a view, a language, and (what `cgw demo` prints) a token to sign in with.
function followLink() {
  const asked = new URLSearchParams(location.hash.slice(1));
  const token = asked.get("token");
  if (token) sessionStorage.setItem("cgw.token", token);
  if (asked.get("lang")) I18N.set(asked.get("lang"));
  if (LOADERS[asked.get("view")]) app.tab = asked.get("view");
  remember();  // the token, if any, leaves the address bar at once
}

document.addEventListener("DOMContentLoaded", () => {
  followLink();
  window.addEventListener("hashchange", () => {
    const before = I18N.lang;
    followLink();
    if (I18N.lang !== before) relabel(); else if (app.token) show(app.tab);
  });
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.tab));
  $("lang").addEventListener("click", () => { I18N.toggle(); remember(); relabel(); });
  $("logout").addEventListener("click", () => signOut());
  $("tm-device").addEventListener("change", () => { fillMetricSelect(); loadTelemetry().catch(showError); });
  $("tm-metric").addEventListener("change", () => loadTelemetry().catch(showError));
  $("tm-range").addEventListener("change", () => loadTelemetry().catch(showError));
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    app.token = $("token").value.trim();
    sessionStorage.setItem("cgw.token", app.token);
    start();
  });
  relabel();
  // The token lives as long as the tab: a shared screen in the community office forgets it when
  // the tab is closed (and an older page's copy in localStorage is removed).
  localStorage.removeItem("cgw.token");
  app.token = sessionStorage.getItem("cgw.token");
  if (app.token) start(); else signOut();
});
