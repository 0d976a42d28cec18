// The live page: the status document (GPUs, holders, queue), the engine sidecars (`GET /gpu/engines`,
// polled every second and after events) and a timeline built from the event stream (`GET /gpu/events`,
// Server-Sent Events read with fetch so that a bearer token can be sent; resumed with Last-Event-ID after
// a cut, so nothing is lost or doubled). No framework, no build step.
"use strict";

// The timeline's window: `?minutes=N` in the page's URL, 5 by default.
const WINDOW_MS = Math.max(1, Number(new URLSearchParams(location.search).get("minutes")) || 5) * 60 * 1000;
const state = {
  token: sessionStorage.getItem("gpu-coordinator-token") || "",
  lastId: null,
  gpus: [],
  holdings: new Map(), // key request_id|fence -> {gpu, service, request, fence, priority, from, to}
  marks: [],           // {gpu, at, kind, request}
  maxId: -1,           // the highest event id (stream sequence) applied
  statusPending: false,
  statusAgain: false,
  enginesPending: false,
  enginesAgain: false,
  streaming: false,    // the event stream is open
  frames: [],          // event -> paint delays, in ms (window.gpuPageStats)
};
window.gpuPageStats = { eventToPaintMs: state.frames, events: 0 };

const $ = (id) => document.getElementById(id);
const prio = (p) => "p" + Math.min(p ?? 3, 3);
const mb = (n) => (n >= 1024 ? (n / 1024).toFixed(1) + " GB" : n + " MB");
const ago = (ms) => (ms < 1000 ? ms + " ms" : ms < 60000 ? (ms / 1000).toFixed(1) + " s" : Math.round(ms / 60000) + " min");

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

function setConnection(s, text) {
  const el = $("connection");
  el.dataset.state = s;
  el.textContent = text;
}

// Resolved when the operator submits a token.
let tokenEntered = null;
const nextToken = () => new Promise((resolve) => { tokenEntered = resolve; });

// A call made with `used` was refused: ask for a token, unless a newer one was typed in meanwhile.
function needToken(used) {
  if (used !== state.token) return;
  $("login").hidden = false;
  $("login-error").textContent = used ? "The token was not accepted." : "";
  $("token").focus();
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem("gpu-coordinator-token", state.token);
  $("login").hidden = true;
  $("login-error").textContent = "";
  refreshStatus();
  refreshEngines();
  if (tokenEntered) tokenEntered();
});

// ----- status ---------------------------------------------------------------------------------------

async function refreshStatus() {
  if (state.statusPending) { state.statusAgain = true; return; }
  state.statusPending = true;
  const used = state.token;
  try {
    const r = await fetch("/gpu/status?limit=1000", { headers: headers() });
    if (r.status === 401 || r.status === 403) { needToken(used); return; }
    if (!r.ok) { setConnection("lost", "the coordinator answers " + r.status); return; }
    renderStatus(await r.json());
    // A status answered again after a 503 (a change of leader) while the events kept coming.
    if (state.streaming) setConnection("live", "live");
  } catch (e) {
    setConnection("lost", "the coordinator is out of reach; retrying");
  } finally {
    state.statusPending = false;
    if (state.statusAgain) { state.statusAgain = false; setTimeout(refreshStatus, 100); }
  }
}

// The GPU cards; with node agents, grouped by host, each host with its state and its last sample's age
// (a GPU whose host this leader has not heard yet is under its host, "not heard yet").
function renderGpus(doc) {
  const box = $("gpus");
  const hosts = doc.hosts || [];
  if (!hosts.length && !doc.gpus.some((g) => g.host)) {
    box.className = "cards";
    box.replaceChildren(...doc.gpus.map(gpuCard));
    return;
  }
  box.className = "hosts";
  const groups = new Map(hosts.map((h) => [h.host, { info: h, gpus: [] }]));
  for (const g of doc.gpus) {
    const key = g.host || "";
    if (!groups.has(key)) groups.set(key, { info: null, gpus: [] });
    groups.get(key).gpus.push(g);
  }
  const sections = [...groups.entries()].map(([name, group]) => {
    const section = document.createElement("section");
    section.className = "host";
    section.dataset.host = name;
    const state = group.info ? group.info.state : "unheard";
    section.dataset.state = state;
    const title = document.createElement("h3");
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.state = state;
    badge.textContent = state === "unheard" ? "not heard yet" : state;
    const age = document.createElement("span");
    age.className = "sample-age";
    age.textContent = group.info ? "last sample " + ago(group.info.last_sample_age_ms) + " ago" : "";
    title.append(document.createTextNode(name + " "), badge, document.createTextNode(" "), age);
    const cards = document.createElement("div");
    cards.className = "cards";
    cards.replaceChildren(...group.gpus.map(gpuCard));
    section.append(title, cards);
    return section;
  });
  box.replaceChildren(...sections);
}

// One GPU: its VRAM bar by holder, what is used outside the leases, and its holders.
function gpuCard(g) {
  const card = document.createElement("article");
  card.className = "gpu";
  card.dataset.gpu = g.id;
  const title = document.createElement("h3");
  title.textContent = "GPU " + g.id + " — " + mb(g.total_mb) + ", " + mb(g.free_mb) + " free"
    + (g.reachable === false ? " — takes no new grants" : "");
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.setAttribute("role", "img");
  bar.setAttribute("aria-label", "VRAM: " + mb(g.used_mb) + " used of " + mb(g.total_mb));
  for (const h of g.holders) {
    const seg = document.createElement("span");
    seg.className = prio(h.priority);
    seg.style.width = (100 * h.vram_mb / g.total_mb) + "%";
    seg.title = h.service_id + ": " + mb(h.vram_mb);
    bar.appendChild(seg);
  }
  if (g.external_mb > 0) {
    const ext = document.createElement("span");
    ext.className = "external";
    ext.style.width = (100 * g.external_mb / g.total_mb) + "%";
    ext.title = "outside the leases (NVML): " + mb(g.external_mb);
    bar.appendChild(ext);
  }
  const extLine = document.createElement("p");
  extLine.className = "external-mb";
  extLine.textContent = "outside the leases: " + mb(g.external_mb) + " (" + g.vram_source + ")";
  const list = document.createElement("ul");
  list.className = "holders";
  for (const h of g.holders) {
    const li = document.createElement("li");
    li.className = "holder";
    li.dataset.request = h.request_id;
    li.dataset.state = h.state;
    const who = document.createElement("span");
    who.textContent = h.service_id + " · " + h.request_id + " · p" + h.priority + " · fence " + h.fence;
    const what = document.createElement("span");
    what.className = "state";
    what.textContent = mb(h.vram_mb) + (h.state === "pausing" ? " · pausing" : "");
    li.append(who, what);
    list.appendChild(li);
  }
  card.append(title, bar, extLine, list);
  return card;
}

function renderStatus(doc) {
  state.gpus = doc.gpus.map((g) => g.id);
  $("leader").textContent = doc.leader ? "leader " + doc.leader.holder + " (term " + doc.leader.term + ")" : "";
  renderGpus(doc);

  $("queue-total").textContent = "(" + doc.queue_total + " waiting, " + doc.paused.length + " paused)";
  const now = Date.now();
  const rows = doc.queue.map((q) => {
    const tr = document.createElement("tr");
    tr.dataset.request = q.request_id;
    const cells = [
      q.position, q.service_id, q.request_id, q.priority,
      q.vram_mb == null ? "whole GPU" : mb(q.vram_mb),
      ago(Math.max(0, now - Date.parse(q.requested_at))),
      q.estimated_wait_ms == null ? "—" : ago(q.estimated_wait_ms),
      q.paused ? "paused" : "queued",
    ];
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = String(c);
      tr.appendChild(td);
    }
    return tr;
  });
  $("queue").tBodies[0].replaceChildren(...rows);
  renderServices(doc.services || []);
  drawTimeline();
}

// Each service's VRAM against its limits (the status document's `services`, from `[services]`).
function renderServices(services) {
  $("services-panel").hidden = services.length === 0;
  const rows = services.map((s) => {
    const tr = document.createElement("tr");
    tr.dataset.service = s.service_id;
    const cells = [
      s.service_id, mb(s.used_mb), mb(s.borrowed_mb),
      s.guaranteed_vram_mb == null ? "—" : mb(s.guaranteed_vram_mb),
      s.max_vram_mb == null ? "—" : mb(s.max_vram_mb),
    ];
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = String(c);
      tr.appendChild(td);
    }
    return tr;
  });
  $("services").tBodies[0].replaceChildren(...rows);
}

// ----- engines --------------------------------------------------------------------------------------

// The sidecars change state between the coordinator's events too (waking, going to sleep): polled.
async function refreshEngines() {
  if (state.enginesPending) { state.enginesAgain = true; return; }
  state.enginesPending = true;
  try {
    const r = await fetch("/gpu/engines", { headers: headers() });
    // A refused token is the status call's to ask about; a coordinator without sidecars' figures (404)
    // shows no panel.
    if (r.ok) renderEngines(await r.json());
    else renderEngines([]);
  } catch (e) {
    // Out of reach: the connection line says so; the last figures stay.
  } finally {
    state.enginesPending = false;
    if (state.enginesAgain) { state.enginesAgain = false; setTimeout(refreshEngines, 100); }
  }
}

function renderEngines(engines) {
  $("engines-panel").hidden = engines.length === 0;
  const time = (ms, count, what) => {
    const td = document.createElement("td");
    td.textContent = ms == null ? "—" : ago(ms);
    td.title = count + " " + what + (count === 1 ? "" : "s");
    return td;
  };
  const rows = engines.map((e) => {
    const tr = document.createElement("tr");
    tr.dataset.service = e.service;
    tr.dataset.state = e.state;
    const service = document.createElement("td");
    service.textContent = e.service;
    service.title = "the sidecar listens on " + e.listen;
    const kind = document.createElement("td");
    kind.textContent = e.kind;
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.state = e.state;
    badge.textContent = e.state.replace(/_/g, " ");
    const stateCell = document.createElement("td");
    stateCell.appendChild(badge);
    const waiting = document.createElement("td");
    waiting.className = "waiting";
    waiting.textContent = String(e.waiting);
    const inFlight = document.createElement("td");
    inFlight.className = "in-flight";
    inFlight.textContent = String(e.in_flight);
    tr.append(service, kind, stateCell, waiting, inFlight,
      time(e.last_sleep_ms, e.sleeps, "sleep"), time(e.last_wake_ms, e.wakes, "wake"));
    return tr;
  });
  $("engines").tBodies[0].replaceChildren(...rows);
}

// ----- events ---------------------------------------------------------------------------------------

const ENDS = new Set(["released", "revoked", "expired", "paused", "timed_out", "cancelled"]);
const MARKS = { preempting: "▼", paused: "●", revoked: "✕", expired: "!" };

function applyEvent(id, ev) {
  if (id != null) {
    const n = Number(id);
    if (n <= state.maxId) return; // seen before a reconnect: not applied twice
    state.maxId = n;
  }
  window.gpuPageStats.events += 1;
  const at = Date.parse(ev.at);
  if (ev.kind === "granted" || ev.kind === "resumed") {
    state.holdings.set(ev.request_id + "|" + ev.fence, {
      gpu: ev.gpu, service: ev.service_id, request: ev.request_id, fence: ev.fence,
      priority: ev.priority, from: at, to: null,
    });
  } else if (ENDS.has(ev.kind)) {
    for (const h of state.holdings.values()) {
      if (h.request === ev.request_id && h.to == null && (ev.fence == null || h.fence === ev.fence)) h.to = at;
    }
  }
  if (MARKS[ev.kind] && ev.gpu) state.marks.push({ gpu: ev.gpu, at, kind: ev.kind, request: ev.request_id });
}

async function connectEvents() {
  for (;;) {
    const url = state.lastId == null ? "/gpu/events?since=" + WINDOW_MS / 60000 + "m" : "/gpu/events";
    const extra = { Accept: "text/event-stream" };
    if (state.lastId != null) extra["Last-Event-ID"] = state.lastId;
    const used = state.token;
    try {
      const r = await fetch(url, { headers: headers(extra) });
      if (r.status === 401 || r.status === 403) {
        needToken(used);
        setConnection("connecting", "waiting for a token");
        if (used === state.token) await nextToken();
        continue;
      }
      if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
      setConnection("live", "live");
      state.streaming = true;
      refreshStatus();
      await readStream(r.body.getReader());
    } catch (e) {
      // fall through: reconnect
    }
    state.streaming = false;
    setConnection("lost", "reconnecting…");
    await new Promise((res) => setTimeout(res, 1000));
  }
}

async function readStream(reader) {
  const decoder = new TextDecoder();
  let buffer = "";
  let event = {};
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let nl;
    let applied = false;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (line === "") {
        if (event.data) {
          try {
            applyEvent(event.id, JSON.parse(event.data));
            applied = true;
          } catch (e) { /* not an event document */ }
        }
        if (event.id != null) state.lastId = event.id;
        event = {};
      } else if (!line.startsWith(":")) {
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const v = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") event.data = (event.data ? event.data + "\n" : "") + v;
        else if (field === "id") event.id = v;
        else if (field === "event") event.event = v;
      }
    }
    if (applied) {
      const t0 = performance.now();
      requestAnimationFrame(() => {
        drawTimeline();
        state.frames.push(performance.now() - t0);
        if (state.frames.length > 1000) state.frames.shift();
      });
      refreshStatus();
      refreshEngines();
    }
  }
}

// ----- timeline -------------------------------------------------------------------------------------

function drawTimeline() {
  const svg = $("timeline");
  const width = svg.clientWidth || 800;
  const height = svg.clientHeight || 176;
  const now = Date.now();
  const from = now - WINDOW_MS;
  const gpus = state.gpus.length ? state.gpus : [...new Set([...state.holdings.values()].map((h) => h.gpu))];
  const left = 56;
  const laneH = Math.max(18, Math.min(48, (height - 10) / Math.max(1, gpus.length)));
  const x = (t) => left + (width - left - 6) * (Math.max(t, from) - from) / WINDOW_MS;
  const ns = "http://www.w3.org/2000/svg";
  const nodes = [];
  gpus.forEach((g, i) => {
    const y = 5 + i * laneH;
    const label = document.createElementNS(ns, "text");
    label.setAttribute("x", 4); label.setAttribute("y", y + laneH / 2 + 4);
    label.setAttribute("class", "lane-label");
    label.textContent = "GPU " + g;
    nodes.push(label);
    const holdings = [...state.holdings.values()].filter((h) => h.gpu === g && (h.to == null || h.to >= from));
    // Stacked in sub-rows, so that holders sharing the GPU do not cover each other.
    const rows = [];
    for (const h of holdings.sort((a, b) => a.from - b.from)) {
      let r = rows.findIndex((end) => end <= h.from);
      if (r < 0) { r = rows.length; rows.push(0); }
      rows[r] = h.to == null ? Infinity : h.to;
      h.row = r;
    }
    const rowH = (laneH - 4) / Math.max(1, rows.length);
    for (const h of holdings) {
      const rect = document.createElementNS(ns, "rect");
      const x0 = x(h.from), x1 = x(h.to == null ? now : h.to);
      rect.setAttribute("x", x0); rect.setAttribute("y", y + 2 + h.row * rowH);
      rect.setAttribute("width", Math.max(2, x1 - x0)); rect.setAttribute("height", Math.max(2, rowH - 1));
      rect.setAttribute("class", "bar " + prio(h.priority));
      rect.setAttribute("fill", getComputedStyle(document.documentElement).getPropertyValue("--" + prio(h.priority)));
      rect.dataset.request = h.request; rect.dataset.fence = h.fence; rect.dataset.service = h.service;
      rect.dataset.open = h.to == null ? "true" : "false";
      const title = document.createElementNS(ns, "title");
      title.textContent = h.service + " · " + h.request + " · fence " + h.fence + " · p" + h.priority;
      rect.appendChild(title);
      nodes.push(rect);
    }
    for (const m of state.marks.filter((m) => m.gpu === g && m.at >= from)) {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", x(m.at) - 4); t.setAttribute("y", y + laneH - 2);
      t.setAttribute("class", "mark");
      t.dataset.kind = m.kind; t.dataset.request = m.request;
      t.textContent = MARKS[m.kind];
      nodes.push(t);
    }
  });
  svg.replaceChildren(...nodes);
}

// Old holdings and marks leave the window; the bars of open holdings grow.
setInterval(() => {
  const from = Date.now() - WINDOW_MS;
  for (const [k, h] of state.holdings) if (h.to != null && h.to < from) state.holdings.delete(k);
  state.marks = state.marks.filter((m) => m.at >= from);
  drawTimeline();
}, 1000);
setInterval(refreshStatus, 2000);
setInterval(refreshEngines, 1000);
window.addEventListener("resize", drawTimeline);

$("window-minutes").textContent = String(WINDOW_MS / 60000);
refreshStatus();
refreshEngines();
connectEvents();
