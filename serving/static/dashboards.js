// The dashboards page: lays out the panels of infra/grafana/dashboards/*.json (Grafana's 24-column grid) and draws
// them with Chart.js and chartjs-plugin-datasource-prometheus, through the gateway's read-only Prometheus proxy.
// Each panel says its state in data-state (loading, ok, empty, error) so a person and the browser test see the same.
"use strict";

const $ = (id) => document.getElementById(id);
const keyStore = "tandem-api-key"; // shared with the playground
const PROXY = "/dashboards/prometheus";
const DRAWN = new Set(["timeseries", "stat", "table"]);
const SCRAPE_S = 15; // the longest scrape interval Tandem configures (compose, Kubernetes)
let live = []; // charts and timers of the board on screen

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function getJSON(url, options = {}) {
  const resp = await fetch(url, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON: the status line says it */ }
  if (!resp.ok) {
    const msg = (body && (body.error?.message || body.error)) || resp.status + " " + resp.statusText;
    throw new Error(typeof msg === "string" ? msg : JSON.stringify(msg));
  }
  return body;
}

// Grafana's variables as "All" would send them: template variables match everything.
function substitute(expr, stepS, board) {
  const vars = new Set((board.templating?.list || []).map((v) => v.name));
  const rate = Math.max(4 * SCRAPE_S, stepS + SCRAPE_S) + "s";
  return expr
    .replaceAll("$__rate_interval", rate)
    .replaceAll("$__interval", stepS + "s")
    .replaceAll("$__range", rangeS() + "s")
    .replace(/\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]/g, (m, a, b, c) => (vars.has(a || b || c) ? ".*" : m));
}

function rangeS() { return Number($("range").value); }
function refreshS() { return Number($("refresh").value); }
function stepS() { return Math.max(5, Math.round(rangeS() / 240)); }

// Which target a series came from: the plugin names series from their labels only, so a panel with several
// targets tags each query's series with its index (label_replace; a query that returns a scalar cannot be tagged).
const REF = "tandem_ref";
function tagged(expr, i, count) {
  return count > 1 ? `label_replace((${expr}), "${REF}", "${i}", "", "")` : expr;
}

// Grafana's legendFormat ("{{alias}} v{{adapter_version}}", a fixed text, or __auto/empty: the labels).
function legend(metric, targets) {
  const labels = { ...(metric?.labels || {}) };
  const target = targets[Number(labels[REF] || 0)] || {};
  delete labels[REF];
  const fmt = target.legendFormat || "";
  if (fmt && fmt !== "__auto") {
    const text = fmt.replace(/\{\{\s*(\w+)\s*\}\}/g, (m, n) => labels[n] ?? "");
    return text.trim() ? text : fmt; // every label absent: say which were wanted
  }
  const text = Object.entries(labels).map(([k, v]) => `${k}="${v}"`).join(", ");
  return (metric?.name || "") + (text ? `{${text}}` : "") || target.expr || "value";
}

function panelState(el, state, detail = "") {
  el.dataset.state = state;
  const problem = el.querySelector(".problem");
  problem.textContent = state === "error" ? detail : "";
}

// Prometheus's own message for a failing query (the plugin only says "Failed to fetch data"). The panel stays
// "loading" until the message is known, so whoever reads data-state never sees the plugin's vaguer one.
async function explain(el, exprs, fallback) {
  for (const query of exprs) {
    try {
      const body = new URLSearchParams({ query });
      const resp = await fetch(PROXY + "/api/v1/query", { method: "POST", body, headers: headers() });
      const data = await resp.json().catch(() => ({}));
      if (data.status !== "success") {
        const msg = data.error?.message || data.error || resp.status + " " + resp.statusText;
        return panelState(el, "error", `${query}: ${msg}`);
      }
    } catch (e) {
      return panelState(el, "error", `${query}: ${e.message}`);
    }
  }
  panelState(el, "error", `${fallback} (see the browser console)`);
}

// Reads the datasource plugin's state after each draw and mirrors it on the panel element.
const statePlugin = {
  id: "tandem-state",
  afterDraw(chart) {
    const st = chart["datasource-prometheus"];
    const el = chart.canvas.closest(".panel");
    if (!st || st.loading || !el) return;
    if (st.error) {
      if (el.dataset.state !== "error" && !el._explaining) {
        el._explaining = true;
        explain(el, el._exprs, st.error).finally(() => { el._explaining = false; });
      }
      return;
    }
    let points = 0;
    for (const ds of chart.data.datasets) points += ds.data.filter((p) => Number.isFinite(p.y)).length;
    points += (st.statData || []).filter((s) => Number.isFinite(Number(s.value))).length;
    el.dataset.series = String(chart.data.datasets.length + (st.statData || []).length);
    el.dataset.legend = [...chart.data.datasets, ...(st.statData || [])].map((d) => d.label).join("\n");
    panelState(el, points > 0 ? "ok" : "empty");
  },
};

function drawChart(el, panel, exprs) {
  const canvas = document.createElement("canvas");
  el.querySelector(".body").append(canvas);
  const refresh = refreshS();
  const chart = new Chart(canvas, {
    type: "line",
    plugins: [ChartDatasourcePrometheusPlugin, statePlugin],
    options: {
      animation: false,
      responsive: true,
      maintainAspectRatio: false,
      scales: panel.type === "stat" ? { x: { display: false }, y: { display: false } } : undefined,
      plugins: {
        legend: { display: panel.type !== "stat", position: "bottom", labels: { boxWidth: 10, font: { size: 10 } } },
        "datasource-prometheus": {
          chartType: panel.type === "stat" ? "stat" : "timeseries",
          prometheus: { endpoint: location.origin + PROXY, baseURL: "/api/v1", headers: headers(), timeout: 30000 },
          query: exprs,
          timeRange: {
            type: "relative",
            start: -rangeS() * 1000,
            end: 0,
            step: stepS(),
            msUpdateInterval: refresh ? refresh * 1000 : undefined,
          },
          borderWidth: 1.5,
          tension: 0,
          findInLabelMap: (metric) => legend(metric, el._targets),
        },
      },
    },
  });
  live.push({ stop: () => chart.destroy() });
}

async function drawTable(el, panel, exprs) {
  const body = el.querySelector(".body");
  const load = async () => {
    try {
      const rows = [];
      for (const query of exprs) {
        const data = await getJSON(PROXY + "/api/v1/query", { method: "POST", body: new URLSearchParams({ query }) });
        if (data.status !== "success") throw new Error(`${query}: ${data.error}`);
        for (const r of data.data.result) rows.push({ labels: r.metric, value: r.value[1] });
      }
      const cols = [...new Set(rows.flatMap((r) => Object.keys(r.labels)))].filter((c) => c !== "__name__" && c !== REF);
      const table = document.createElement("table");
      const head = table.createTHead().insertRow();
      for (const c of [...cols, "value"]) head.insertCell().outerHTML = `<th>${c}</th>`;
      const tbody = table.createTBody();
      for (const r of rows) {
        const tr = tbody.insertRow();
        for (const c of cols) tr.insertCell().textContent = r.labels[c] ?? "";
        tr.insertCell().textContent = Number(r.value).toPrecision(4).replace(/\.?0+$/, "");
      }
      body.replaceChildren(table);
      el.dataset.series = String(rows.length);
      panelState(el, rows.length ? "ok" : "empty");
    } catch (e) {
      panelState(el, "error", e.message);
    }
  };
  await load();
  if (refreshS()) {
    const timer = setInterval(load, refreshS() * 1000);
    live.push({ stop: () => clearInterval(timer) });
  }
}

function panelElement(panel) {
  const el = document.createElement("div");
  const g = panel.gridPos || { x: 0, y: 0, w: 12, h: 8 };
  el.className = "panel";
  el.style.gridColumn = `${(g.x || 0) + 1} / span ${g.w || 12}`;
  el.style.gridRow = `${(g.y || 0) + 1} / span ${g.h || 8}`;
  el.dataset.title = panel.title || "";
  el.dataset.type = panel.type || "";
  el.dataset.state = "loading";
  el.title = panel.description || "";
  el.innerHTML = '<h3></h3><div class="problem"></div><div class="body"></div>';
  el.querySelector("h3").textContent = panel.title || "(untitled)";
  return el;
}

function drawBoard(entry) {
  for (const item of live) item.stop();
  live = [];
  const root = $("boards");
  root.replaceChildren();
  const section = document.createElement("section");
  section.className = "board";
  root.append(section);
  if (entry.error) {
    section.innerHTML = '<p class="error"></p>';
    section.firstChild.textContent = entry.error;
    return;
  }
  const board = entry.board;
  section.dataset.uid = board.uid || entry.file;
  const grid = document.createElement("div");
  grid.className = "grid";
  section.append(grid);
  for (const panel of board.panels) {
    if (panel.type === "row") {
      const row = document.createElement("div");
      row.className = "row-title";
      row.style.gridRow = `${(panel.gridPos?.y || 0) + 1}`;
      row.textContent = panel.title || "";
      grid.append(row);
      continue;
    }
    const el = panelElement(panel);
    grid.append(el);
    try {
      if (!DRAWN.has(panel.type)) throw new Error(`panel type '${panel.type}' is not drawn on this page (drawn: ${[...DRAWN].join(", ")})`);
      const targets = (panel.targets || []).filter((t) => t.expr && !t.hide);
      if (!targets.length) throw new Error("the panel has no PromQL query");
      const exprs = targets.map((t, i) => tagged(substitute(t.expr, stepS(), board), i, targets.length));
      el._exprs = exprs;
      el._targets = targets;
      if (panel.type === "table") drawTable(el, panel, exprs);
      else drawChart(el, panel, exprs);
    } catch (e) {
      panelState(el, "error", e.message);
    }
  }
}

async function loadAlerts() {
  try {
    const data = await getJSON("/dashboards/alerts?limit=50");
    const rows = data.current.map((a) => {
      const tr = document.createElement("tr");
      tr.className = a.status;
      const labels = Object.entries(a.labels).filter(([k]) => !["alertname", "severity"].includes(k));
      for (const text of [a.status, a.alertname, a.severity, labels.map(([k, v]) => `${k}=${v}`).join(" "),
        a.annotations.summary || "", a.starts_at || a.received_at]) {
        tr.insertCell().textContent = text;
      }
      return tr;
    });
    if (!rows.length) {
      const tr = document.createElement("tr");
      tr.insertCell().textContent = "none received";
      rows.push(tr);
    }
    $("alert-rows").replaceChildren(...rows);
  } catch (e) {
    $("alert-rows").replaceChildren();
    const tr = $("alert-rows").insertRow();
    tr.insertCell().textContent = "alerts unavailable: " + e.message;
    tr.className = "error";
  }
}

let boards = [];
let alertTimer = null;

function showSelected() {
  const entry = boards[Number($("board").value)] || boards[0];
  if (entry) {
    drawBoard(entry);
    const params = new URLSearchParams(location.search);
    params.set("board", entry.board?.uid || entry.file);
    history.replaceState(null, "", "?" + params);
  }
}

function scheduleAlerts() {
  clearInterval(alertTimer);
  if (refreshS()) alertTimer = setInterval(loadAlerts, refreshS() * 1000);
}

// The same key as the playground: from the URL fragment (#key=..., which the browser never sends to the server)
// into localStorage, and out of the address bar; else the one the playground or this page stored.
function keyFromFragment() {
  const key = (new URLSearchParams(location.hash.slice(1)).get("key") || "").trim();
  if (!key) return;
  localStorage.setItem(keyStore, key);
  history.replaceState(null, "", location.pathname + location.search);
}

async function load() {
  try {
    boards = (await getJSON("/dashboards/boards")).boards;
  } catch (e) {
    setStatus("dashboards unavailable: " + e.message, true);
    return;
  }
  const wanted = new URLSearchParams(location.search).get("board");
  $("board").replaceChildren(...boards.map((b, i) => {
    const opt = new Option(b.board?.title || b.file, String(i));
    if (wanted && (b.board?.uid === wanted || b.file === wanted)) opt.selected = true;
    return opt;
  }));
  const broken = boards.filter((b) => b.error).map((b) => b.error);
  setStatus(broken.length ? broken.join("; ") : "", broken.length > 0);
  showSelected();
  loadAlerts();
  scheduleAlerts();
}

function start() {
  keyFromFragment();
  $("api-key").value = localStorage.getItem(keyStore) || "";
  window.addEventListener("unhandledrejection", (e) => e.preventDefault()); // failed panels say so in place
  $("board").addEventListener("change", showSelected);
  $("range").addEventListener("change", showSelected);
  $("refresh").addEventListener("change", () => { scheduleAlerts(); showSelected(); });
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(keyStore, $("api-key").value.trim());
    load();
  });
  load();
}

start();
