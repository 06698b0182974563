// dynft console: polls /v1/status?task=T every 2 s (only points newer than the last one it has)
// and draws the curves on <canvas>. No library, no build step, nothing fetched from elsewhere.
// Every text that comes from the data goes in through textContent, never as HTML. The task
// picked in the selector is kept in the URL (#task=T), so a reload shows the same task.
"use strict";

const POLL_MS = 2000;
const KEEP_S = 24 * 3600;
const LEFT = 54; // room for the y labels, the same in every chart so that their time axes line up
const COLORS = {
  accuracy: "#2563eb", majority: "#9ca3af", rateIn: "#059669", rateTrained: "#d97706", buffer: "#7c3aed",
  drift: "#d97706", promote: "#059669", promoted: "#059669", rejected: "#dc2626", rollback: "#d97706",
  manual: "#2563eb", grid: "#e5e7eb", axis: "#6b7280",
};
const DEFAULT_TASK = "default";
// choice: bumped when a task is picked, so that an answer to an earlier poll is dropped
const state = { points: [], lastT: null, status: null, span: 0, task: taskInUrl(), choice: 0 };
const $ = (id) => document.getElementById(id);

function taskInUrl() {
  return new URLSearchParams(window.location.hash.slice(1)).get("task") || DEFAULT_TASK;
}
function fmt(x, digits = 3) {
  return x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(digits);
}
function pct(x) {
  return x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`;
}
function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}
function when(t) {
  if (t === null || t === undefined) return "–";
  const d = new Date(t * 1000);
  return `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${clock(t)}`;
}

// -- drawing ------------------------------------------------------------------------------

function surface(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 400, h = canvas.clientHeight || 200;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx, w, h };
}

function timeRange() {
  const s = state.status;
  const now = s ? s.now : Date.now() / 1000;
  let start = now - state.span;
  if (state.span === 0) {  // from the first point or the first version, whichever is older
    const firsts = state.points.length ? [state.points[0].t] : [];
    const version = s ? s.versions.find((v) => v.t !== null) : undefined;
    if (version) firsts.push(version.t);
    start = firsts.length ? Math.min(...firsts) : now - 60;
    start -= 0.02 * (now - start); // a margin, so that the first marker is not on the axis
  }
  return [start, Math.max(now, start + 1)];
}

function xAxis(ctx, x, t0, t1, top, bottom, left, right) {
  ctx.fillStyle = COLORS.axis;
  ctx.textAlign = "center";
  for (let i = 0; i <= 3; i++) {
    const t = t0 + ((t1 - t0) * i) / 3;
    const px = Math.min(Math.max(x(t), left + 24), right - 24);
    ctx.fillText(clock(t), px, bottom + 13);
  }
  ctx.strokeStyle = COLORS.grid;
  ctx.beginPath();
  ctx.moveTo(left, bottom + 0.5);
  ctx.lineTo(right, bottom + 0.5);
  ctx.stroke();
}

function markers(ctx, x, t0, t1, top, bottom) {
  const s = state.status;
  const drift = s && s.snapshot ? s.snapshot.drift : [];  // the default task's, as the curves are
  const moves = s && s.task === DEFAULT_TASK ? s.serving_changes : [];
  ctx.setLineDash([4, 3]);
  for (const [items, color] of [[drift, COLORS.drift], [moves, COLORS.promote]]) {
    ctx.strokeStyle = color;
    for (const m of items) {
      if (m.t === null || m.t < t0 || m.t > t1) continue;
      ctx.beginPath();
      ctx.moveTo(Math.round(x(m.t)) + 0.5, top);
      ctx.lineTo(Math.round(x(m.t)) + 0.5, bottom);
      ctx.stroke();
    }
  }
  ctx.setLineDash([]);
}

// A line chart of several series over the shared time axis, with drift and serving markers.
function lineChart(canvas, series, fixedMax) {
  const { ctx, w, h } = surface(canvas);
  const left = LEFT, right = w - 8, top = 8, bottom = h - 18;
  const [t0, t1] = timeRange();
  const shown = state.points.filter((p) => p.t >= t0);
  let max = fixedMax;
  if (max === undefined) {
    max = Math.max(1e-9, ...shown.flatMap((p) => series.map((s) => s.value(p))));
    max = niceCeil(max);
  }
  const x = (t) => left + ((t - t0) / (t1 - t0)) * (right - left);
  const y = (v) => bottom - (Math.min(v, max) / max) * (bottom - top);
  ctx.textAlign = "right";
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    ctx.strokeStyle = COLORS.grid;
    ctx.beginPath();
    ctx.moveTo(left, Math.round(y(v)) + 0.5);
    ctx.lineTo(right, Math.round(y(v)) + 0.5);
    ctx.stroke();
    ctx.fillStyle = COLORS.axis;
    ctx.fillText(fixedMax === 1 ? `${Math.round(v * 100)}%` : shortNumber(v), left - 5, y(v) + 4);
  }
  xAxis(ctx, x, t0, t1, top, bottom, left, right);
  markers(ctx, x, t0, t1, top, bottom);
  ctx.lineWidth = 1.8;
  ctx.lineJoin = "round";
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.beginPath();
    shown.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(s.value(p))) : ctx.moveTo(x(p.t), y(s.value(p)))));
    ctx.stroke();
  }
  ctx.lineWidth = 1;
  canvas.dataset.points = String(state.points.length);
  canvas.dataset.shown = String(shown.length);
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
function shortNumber(v) {
  return v >= 1000 ? `${(v / 1000).toFixed(1)}k` : v >= 10 ? v.toFixed(0) : v.toFixed(1);
}

// The versions on the same time axis: gate decisions as dots, serving moves as triangles.
function timeline(canvas) {
  const { ctx, w, h } = surface(canvas);
  const s = state.status;
  const left = LEFT, right = w - 8;
  const [t0, t1] = timeRange();
  const x = (t) => left + ((t - t0) / (t1 - t0)) * (right - left);
  xAxis(ctx, x, t0, t1, 0, h - 18, left, right);
  ctx.fillStyle = COLORS.axis;
  ctx.textAlign = "right";
  ctx.fillText("gate", left - 5, 22);
  ctx.fillText("serving", left - 5, 44);
  let lastLabel = -Infinity;
  for (const v of s.versions) {
    if (v.t === null || v.t < t0 || !v.decision) continue;
    const px = x(v.t);
    ctx.fillStyle = COLORS[v.decision];
    ctx.beginPath();
    ctx.arc(px, 18, v.version === s.serving.version ? 6 : 4.5, 0, 2 * Math.PI);
    ctx.fill();
    if (v.version === s.serving.version) {
      ctx.strokeStyle = "#111827";
      ctx.stroke();
    }
    if (px - lastLabel > 26) {
      ctx.fillStyle = COLORS.axis;
      ctx.textAlign = "center";
      ctx.fillText(`v${v.version}`, px, 8);
      lastLabel = px;
    }
  }
  for (const m of s.serving_changes) {
    if (m.t === null || m.t < t0) continue;
    const px = x(m.t);
    ctx.fillStyle = m.kind === "gate" ? COLORS.promote : COLORS[m.kind];
    ctx.beginPath();
    ctx.moveTo(px, 35);
    ctx.lineTo(px + 5, 45);
    ctx.lineTo(px - 5, 45);
    ctx.fill();
  }
  const promoted = s.versions.filter((v) => v.decision === "promoted").length;
  canvas.dataset.promotedCount = String(promoted);
  canvas.dataset.rejectedCount = String(s.versions.filter((v) => v.decision === "rejected").length);
  $("versions-summary").textContent = `${promoted} promoted, ${s.versions.length - promoted} other`;
}

// -- tables -------------------------------------------------------------------------------

function fill(tableId, rows, cells, rowClass) {
  const body = $(tableId).querySelector("tbody");
  if (!rows.length) {
    const td = document.createElement("td");
    td.colSpan = $(tableId).querySelectorAll("th").length;
    td.className = "muted";
    td.textContent = "none so far";
    const tr = document.createElement("tr");
    tr.append(td);
    body.replaceChildren(tr);
    return;
  }
  body.replaceChildren(
    ...rows.map((r) => {
      const tr = document.createElement("tr");
      if (rowClass) tr.className = rowClass(r);
      for (const [value, cls] of cells(r)) {
        const td = document.createElement("td");
        td.textContent = value;
        if (cls) td.className = cls;
        tr.append(td);
      }
      return tr;
    })
  );
}

function tables(s) {
  const versions = s.versions.slice(-8).reverse();
  fill("versions", versions, (v) => [
    [`v${v.version}${v.version === s.serving.version ? " (serving)" : ""}`],
    [when(v.t)],
    [v.decision || "–", v.decision || ""],
    [fmt(v.accuracy)],
    [fmt(v.serving_accuracy)],
  ]);
  fill("requests", Object.entries(s.requests).sort(), ([code, n]) => [[code], [String(n)]]);
  const select = $("task");
  $("task-box").hidden = s.tasks.length < 2 && s.task === DEFAULT_TASK;
  if ([...select.options].map((o) => o.value).join("\n") !== s.tasks.join("\n")) {
    select.replaceChildren(...s.tasks.map((t) => new Option(t, t)));
  }
  select.value = s.task;
  const snap = s.snapshot;
  if (!snap) return;
  const named = s.task === DEFAULT_TASK ? "" : `task ${s.task}, `;
  $("labels-window").textContent = `(${named}last ${snap.window} of its events)`;
  const labels = s.labels.slice().sort((a, b) => b.count - a.count || a.label.localeCompare(b.label));
  fill("labels", labels, (l) => [[l.label], [String(l.count)], [pct(l.accuracy)], [String(l.buffered)]],
    (l) => (l.new ? "new" : ""));
  fill("dead-counts", Object.entries(snap.dead_letter_counts), ([reason, n]) => [[reason], [String(n)]]);
  fill("dead-latest", snap.dead_letters, (d) => [[d.id], [d.reason], [d.detail ?? ""], [d.text === null ? "(hidden)" : d.text, "text"]]);
  $("lag-card").hidden = snap.kafka_lag.length === 0;
  fill("lag", snap.kafka_lag, (l) => [[l.topic], [String(l.partition)], [String(l.lag)]]);
  const stats = snap.task_stats || [];
  $("tasks-card").hidden = stats.length < 2;
  const version = (v) => (v === null ? "–" : "v" + v);
  fill("tasks", stats, (t) => [[t.task], [String(t.events)], [pct(t.accuracy)], [version(t.serving)],
    [version(t.latest)], [String(t.drift)]], (t) => (t.task === s.task ? "chosen" : ""));
}

// The serving version's own accuracy at its gate, as the versions table shows it; "n/a" when its
// gate measured none (promoted before enough events were held out, by an operator, gate off).
function servedAccuracy(s) {
  const tile = $("k-served");
  const v = s.versions.find((m) => m.version === s.serving.version);
  if (!v || v.accuracy === null) {
    tile.textContent = "n/a";
    tile.title = s.serving.version === null ? "no version serves yet"
      : `v${s.serving.version} serves without an accuracy measured at its gate`;
    return;
  }
  const n = v.holdout_events === null ? "" : ` ${v.holdout_events}`;
  const events = {
    prequential: `the${n} events trained after the version then serving (the trainer's answers before learning each)`,
    newest: `the newest${n} events held out from training`,
  }[v.scope] || `the${n} events held out from training`;
  tile.textContent = pct(v.accuracy);
  tile.title = `v${v.version} (serving): its accuracy at its promotion gate (${v.decision ?? "no decision"}), on ` +
    `${events}; not a measurement of the answers served since`;
}

// The KPI tiles: the chosen task's events, accuracy and drift; the rate is every task's, the rest the default's.
function kpis(s) {
  const p = state.points[state.points.length - 1];
  const own = s.task_stat || (p && s.task === DEFAULT_TASK ? p : null);
  $("k-events").textContent = own ? String(own.events) : "–";
  $("k-accuracy").textContent = own ? pct(own.accuracy) : "–";
  $("k-drift").textContent = own ? String(own.drift) : "–";
  const majority = $("k-majority");
  majority.textContent = p && s.task === DEFAULT_TASK ? pct(p.majority) : "–";
  majority.title = s.task === DEFAULT_TASK ? "" : "measured for the default task only";
  if (p) {
    $("k-rate").textContent = fmt(p.rate_in, 1);
    $("k-buffer").textContent = pct(p.buffer_fill);
  }
  servedAccuracy(s);
}

// -- the page -----------------------------------------------------------------------------

function render() {
  const s = state.status;
  if (!s) return;
  document.body.dataset.role = s.role;
  $("role").textContent = s.role === "replica" ? "serving replica" : "trainer + server";
  const badge = $("serving");
  badge.dataset.servingVersion = s.serving.version === null ? "" : String(s.serving.version);
  badge.dataset.task = s.task;
  const which = s.task === DEFAULT_TASK ? "" : `${s.task}: `;
  badge.textContent = `${which}serving v${s.serving.version ?? "–"}${s.serving.pinned ? " (pinned)" : ""}`;
  const latest = s.versions.length ? s.versions[s.versions.length - 1].version : null;
  $("latest").textContent = `latest v${latest ?? "–"}`;
  document.body.dataset.lastT = state.lastT === null ? "" : String(state.lastT);
  kpis(s);
  $("curves-task").hidden = s.task === DEFAULT_TASK;
  if (s.role === "colocated") {
    lineChart($("chart-accuracy"), [
      { color: COLORS.accuracy, value: (q) => q.accuracy },
      { color: COLORS.majority, value: (q) => q.majority },
    ], 1);
    lineChart($("chart-rate"), [
      { color: COLORS.rateIn, value: (q) => q.rate_in },
      { color: COLORS.rateTrained, value: (q) => q.rate_trained },
    ]);
    lineChart($("chart-buffer"), [{ color: COLORS.buffer, value: (q) => q.buffer_fill }], 1);
  }
  timeline($("timeline"));
  tables(s);
  $("updated").textContent = `updated ${clock(s.now)}`;
}

async function poll() {
  const task = state.task, choice = state.choice;
  const since = state.lastT === null ? "" : `&since=${state.lastT}`;
  try {
    const response = await fetch(`/v1/status?task=${encodeURIComponent(task)}${since}`, { cache: "no-store" });
    if (choice !== state.choice) return;  // another task was picked meanwhile: its own poll is on the way
    // A task in the URL that this server lacks (404) or that names none (422): the default one.
    if ((response.status === 404 || response.status === 422) && task !== DEFAULT_TASK) {
      chooseTask(DEFAULT_TASK);
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const s = await response.json();
    if (choice !== state.choice) return;
    // Two polls may overlap (a slow one, a task picked): only points newer than those held count.
    const fresh = state.lastT === null ? s.points : s.points.filter((p) => p.t > state.lastT);
    if (fresh.length) {
      state.points.push(...fresh);
      state.lastT = fresh[fresh.length - 1].t;
      const oldest = state.lastT - KEEP_S;
      if (state.points[0].t < oldest) state.points = state.points.filter((q) => q.t >= oldest);
    }
    state.status = s;
    render();
  } catch (err) {
    $("updated").textContent = `no answer (${err.message}); retrying`;
  }
}

for (const button of document.querySelectorAll("#range button")) {
  button.addEventListener("click", () => {
    state.span = Number(button.dataset.span);
    document.querySelectorAll("#range button").forEach((b) => b.classList.toggle("on", b === button));
    render();
  });
}
// Another task: its labels, versions and serving pointer, fetched from scratch (the cursor reset).
function chooseTask(task) {
  state.task = task;
  state.choice += 1;
  state.points = [];
  state.lastT = null;
  const hash = task === DEFAULT_TASK ? "" : `#task=${encodeURIComponent(task)}`;
  history.replaceState(null, "", `${window.location.pathname}${window.location.search}${hash}`);
  poll();
}
$("task").addEventListener("change", (e) => chooseTask(e.target.value));
window.addEventListener("hashchange", () => {
  if (taskInUrl() !== state.task) chooseTask(taskInUrl());
});
window.addEventListener("resize", render);
poll();
setInterval(poll, POLL_MS);
