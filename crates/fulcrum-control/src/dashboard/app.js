// Fulcrum's dashboard: one stream (GET /ui/stream, server-sent events read with fetch so the
// bearer token can go in a header), charts drawn as SVG, actions through the admin API.
// Text from the server is only ever set as textContent.
"use strict";

const WINDOW_S = 300; // the charts' span: the last five minutes
const SHARE_S = 30; // each endpoint's share: of the answers of the last 30 s
const COLORS = ["#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#76b7b2", "#b07aa1"];

const state = { samples: [], policies: [], token: sessionStorage.getItem("fulcrum-token") || "", pools: new Map() };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") Object.assign(node.style, v); // CSSOM: allowed by the page's CSP, unlike style attributes
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h.Authorization = "Bearer " + state.token;
  return h;
}

function setStatus(kind, text) {
  const s = document.getElementById("status");
  s.className = "status " + kind;
  s.textContent = text;
}

function say(text, ok) {
  const m = document.getElementById("message");
  m.textContent = text;
  m.className = ok ? "ok" : "";
}

// --- the stream ---

async function connect() {
  setStatus("connecting", "connecting");
  let response;
  try {
    response = await fetch("/ui/stream", { headers: headers(), cache: "no-store" });
  } catch (e) {
    return retry();
  }
  if (response.status === 401) {
    setStatus("token", "needs token");
    document.getElementById("token-form").hidden = false;
    return;
  }
  if (!response.ok || !response.body) return retry();
  document.getElementById("token-form").hidden = true;
  setStatus("live", "live");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      break;
    }
    if (chunk.done) break;
    buffer += decoder.decode(chunk.value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      let data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) handle(event, JSON.parse(data));
    }
  }
  retry();
}

function retry() {
  setStatus("connecting", "reconnecting");
  setTimeout(connect, 2000);
}

function handle(event, data) {
  if (event === "hello") {
    state.samples = data.history || [];
    state.policies = data.policies || [];
  } else if (event === "state") {
    const last = state.samples[state.samples.length - 1];
    if (data.sample && (!last || data.sample.t > last.t)) state.samples.push(data.sample);
    const cutoff = Date.now() - 610 * 1000;
    while (state.samples.length && state.samples[0].t < cutoff) state.samples.shift();
    render(data);
  }
}

// --- rendering ---

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return Number(v).toFixed(digits === undefined ? 0 : digits);
}

function render(data) {
  document.getElementById("generation").textContent = "configuration generation " + data.generation;
  document.getElementById("updated").textContent = "updated " + new Date(data.t).toLocaleTimeString();
  const root = document.getElementById("pools");
  const seen = new Set();
  for (const pool of data.pools) {
    seen.add(pool.name);
    let view = state.pools.get(pool.name);
    if (!view) {
      view = poolView(pool.name);
      state.pools.set(pool.name, view);
      root.append(view.node);
    }
    updatePool(view, pool);
  }
  for (const [name, view] of state.pools) {
    if (!seen.has(name)) {
      view.node.remove();
      state.pools.delete(name);
    }
  }
  renderEvents(data.events || []);
}

function poolView(name) {
  const select = el("select", { "data-role": "policy" });
  const apply = el("button", { type: "button", "data-role": "apply-policy" }, "Apply policy");
  apply.addEventListener("click", () =>
    act("PUT", `/pools/${encodeURIComponent(name)}/policy`, { policy: select.value }, `policy of ${name} set to ${select.value}`),
  );
  const figures = el("span", { class: "figures" });
  const scale = el("div", { class: "scale", "data-role": "scale" });
  const charts = el("div", { class: "charts" });
  const tbody = el("tbody");
  const table = el(
    "table",
    { class: "endpoints" },
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        ...["endpoint", "address", "state", "in flight", "share", "learned speed", "predicted TTFT 1k", "engine waiting", "running", "KV use", "hit rate", "weight", ""].map((h) =>
          el("th", {}, h),
        ),
      ),
    ),
    tbody,
  );
  const node = el(
    "section",
    { class: "panel pool", "data-pool": name },
    el("div", { class: "pool-head" }, el("h2", {}, "pool " + name), figures, select, apply),
    scale,
    charts,
    table,
  );
  const chartViews = {
    rate: chartView(charts, "Requests / s", ["answers", "5xx"]),
    ttft: chartView(charts, "Time to first token (ms)", ["p50", "p99"]),
    e2e: chartView(charts, "End-to-end latency (ms)", ["p50", "p99"]),
  };
  return { name, node, select, figures, scale, charts, chartViews, tbody, rows: new Map(), policiesSet: false };
}

function chartView(parent, title, series) {
  const legend = el("div", { class: "legend" });
  series.forEach((s, i) => legend.append(el("span", {}, el("i", { style: { background: COLORS[i] } }), s)));
  const area = svg("svg", { viewBox: "0 0 300 120", preserveAspectRatio: "none" });
  const node = el("div", { class: "chart", "data-chart": title }, el("h3", {}, title), area, legend);
  parent.append(node);
  return { node, area, series };
}

function drawChart(view, lines) {
  const area = view.area;
  while (area.firstChild) area.removeChild(area.firstChild);
  const now = Date.now();
  // The last five minutes, or less while the history is shorter (at least one minute).
  const oldest = state.samples.length ? state.samples[0].t : now;
  const span = Math.min(WINDOW_S, Math.max(60, (now - oldest) / 1000));
  let max = 0;
  for (const line of lines) for (const [, v] of line) if (v !== null && v > max) max = v;
  max = max > 0 ? max * 1.1 : 1;
  const x = (t) => 300 - ((now - t) / 1000 / span) * 300;
  const y = (v) => 115 - (v / max) * 105;
  lines.forEach((line, i) => {
    const points = line.filter(([t, v]) => v !== null && now - t <= span * 1000).map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`);
    if (points.length) area.append(svg("polyline", { points: points.join(" "), fill: "none", stroke: COLORS[i], "stroke-width": 1.5, "vector-effect": "non-scaling-stroke", "data-series": view.series[i] }));
  });
  const label = svg("text", { x: 4, y: 12, "font-size": 10, fill: "#667085" });
  label.textContent = "max " + fmt(max / 1.1, max < 10 ? 1 : 0);
  area.append(label);
  const spanLabel = svg("text", { x: 4, y: 116, "font-size": 10, fill: "#667085" });
  spanLabel.textContent = `last ${Math.round(span)} s`;
  area.append(spanLabel);
}

function series(pool, key) {
  return state.samples.map((s) => [s.t, s.pools && s.pools[pool] ? s.pools[pool][key] : null]);
}

function shares(pool) {
  const totals = {};
  let all = 0;
  const from = Date.now() - SHARE_S * 1000;
  for (const s of state.samples) {
    const p = s.pools && s.pools[pool];
    if (!p || s.t < from) continue;
    for (const [id, n] of Object.entries(p.endpoints || {})) {
      totals[id] = (totals[id] || 0) + n;
      all += n;
    }
  }
  return { totals, all };
}

function updatePool(view, pool) {
  if (!view.policiesSet && state.policies.length) {
    for (const p of state.policies) view.select.append(el("option", { value: p }, p));
    view.policiesSet = true;
  }
  if (document.activeElement !== view.select) view.select.value = pool.policy;
  const last = state.samples.length ? state.samples[state.samples.length - 1].pools[pool.name] : null;
  view.figures.textContent = `policy ${pool.policy} · ${pool.in_flight} in flight` + (last ? ` · ${last.rps} answers/s` : "");
  renderScale(view, pool);
  drawChart(view.chartViews.rate, [series(pool.name, "rps"), series(pool.name, "errors")]);
  drawChart(view.chartViews.ttft, [series(pool.name, "ttft_p50_ms"), series(pool.name, "ttft_p99_ms")]);
  drawChart(view.chartViews.e2e, [series(pool.name, "e2e_p50_ms"), series(pool.name, "e2e_p99_ms")]);
  const share = shares(pool.name);
  const seen = new Set();
  for (const e of pool.endpoints) {
    seen.add(e.id);
    let row = view.rows.get(e.id);
    if (!row) {
      row = endpointRow(pool.name, e.id);
      view.rows.set(e.id, row);
      view.tbody.append(row.node);
    }
    updateRow(row, e, share);
  }
  for (const [id, row] of view.rows) {
    if (!seen.has(id)) {
      row.node.remove();
      view.rows.delete(id);
    }
  }
}

function renderScale(view, pool) {
  const s = pool.scale;
  if (!s) {
    view.scale.textContent = "not autoscaled";
    if (view.chartViews.replicas) {
      view.chartViews.replicas.node.remove();
      delete view.chartViews.replicas;
    }
    return;
  }
  let text = `autoscaler (${s.actuator}): ${s.replicas} replicas, wants ${s.desired_replicas} (bounds ${s.min_replicas}..${s.max_replicas}): ${s.reason}`;
  if (s.forecast) text += ` · forecast ${fmt(s.forecast.rate_now, 1)} req/s now, ${fmt(s.forecast.rate_ahead, 1)} req/s in ${fmt(s.forecast.lead_seconds)} s → ${s.forecast.replicas} replicas`;
  view.scale.textContent = text;
  if (!view.chartViews.replicas) view.chartViews.replicas = chartView(view.charts, "Replicas", ["endpoints serving", "desired", "forecast"]);
  drawChart(view.chartViews.replicas, [series(pool.name, "serving"), series(pool.name, "desired"), series(pool.name, "forecast_replicas")]);
}

function endpointRow(pool, id) {
  const cells = {};
  const cell = (name, cls) => (cells[name] = el("td", { class: cls || "", "data-field": name }));
  const weight = el("input", { class: "weight", type: "number", min: "1", max: "1000", "aria-label": `weight of ${id}` });
  const setWeight = el("button", { type: "button", "data-action": "weight" }, "Set");
  setWeight.addEventListener("click", () => {
    const w = Number(weight.value);
    act("PUT", `/pools/${encodeURIComponent(pool)}/endpoints/${encodeURIComponent(id)}/weight`, { weight: w }, `weight of ${id} set to ${w}`);
    weight.value = "";
  });
  const drain = el("button", { type: "button", "data-action": "drain" }, "Drain");
  drain.addEventListener("click", () =>
    act("POST", `/pools/${encodeURIComponent(pool)}/endpoints/${encodeURIComponent(id)}/drain?timeout_ms=0`, null, `${id} draining`),
  );
  const undrain = el("button", { type: "button", "data-action": "undrain" }, "Undrain");
  undrain.addEventListener("click", () =>
    act("POST", `/pools/${encodeURIComponent(pool)}/endpoints/${encodeURIComponent(id)}/undrain`, null, `${id} takes requests again`),
  );
  const node = el(
    "tr",
    { "data-endpoint": id },
    el("td", {}, id),
    cell("address"),
    cell("state", "state"),
    cell("in_flight", "num"),
    cell("share"),
    cell("speed", "num"),
    cell("predicted", "num"),
    cell("waiting", "num"),
    cell("running", "num"),
    cell("kv", "num"),
    cell("hit_rate", "num"),
    el("td", {}, (cells.weight_now = el("span", { "data-field": "weight" })), " ", weight, setWeight),
    el("td", {}, drain, " ", undrain),
  );
  return { node, cells, drain, undrain };
}

function updateRow(row, e, share) {
  const c = row.cells;
  c.address.textContent = e.address;
  const available = e.available;
  c.state.textContent = available ? "available" : e.unavailable_because.join(", ") || "unavailable";
  c.state.className = "state " + (available ? "available" : "unavailable");
  c.in_flight.textContent = e.in_flight;
  const n = share.totals[e.id] || 0;
  const pct = share.all ? (100 * n) / share.all : 0;
  c.share.textContent = "";
  c.share.append(el("span", { class: "share", style: { width: `${(pct * 0.8).toFixed(1)}px` } }), ` ${pct.toFixed(0)}%`);
  c.speed.textContent = fmt(e.learned && e.learned.speed, 2);
  c.predicted.textContent = fmt(e.learned && e.learned.predicted_ttft_ms_1k_tokens) + " ms";
  c.waiting.textContent = e.engine ? e.engine.waiting : "–";
  c.running.textContent = e.engine ? e.engine.running : "–";
  c.kv.textContent = e.engine ? fmt(100 * e.engine.kv_cache_usage) + "%" : "–";
  c.hit_rate.textContent = e.engine && e.engine.prefix_cache_hit_rate !== null && e.engine.prefix_cache_hit_rate !== undefined ? fmt(100 * e.engine.prefix_cache_hit_rate) + "%" : "–";
  c.weight_now.textContent = e.weight;
  const draining = e.unavailable_because.includes("draining");
  row.drain.disabled = draining;
  row.undrain.disabled = !draining;
}

function renderEvents(events) {
  const tbody = document.querySelector("#events tbody");
  tbody.textContent = "";
  for (const e of events) {
    tbody.append(
      el(
        "tr",
        { "data-kind": e.kind },
        el("td", {}, new Date(e.t).toLocaleTimeString()),
        el("td", {}, e.pool),
        el("td", {}, e.endpoint),
        el("td", {}, e.kind),
        el("td", { class: "detail" }, e.detail),
      ),
    );
  }
}

// --- actions ---

async function act(method, path, body, done) {
  const init = { method, headers: headers(body ? { "content-type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  try {
    const response = await fetch(path, init);
    const text = await response.text();
    if (response.ok) return say(done, true);
    let message = text;
    try {
      message = JSON.parse(text).error.message;
    } catch (e) {
      /* not JSON: show the text */
    }
    say(`${method} ${path}: ${response.status}: ${message}`, false);
  } catch (e) {
    say(`${method} ${path}: ${e}`, false);
  }
}

document.getElementById("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = document.getElementById("token").value.trim();
  sessionStorage.setItem("fulcrum-token", state.token);
  connect();
});

connect();
