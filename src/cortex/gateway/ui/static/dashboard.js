// cortex fleet dashboard (docs/operators.md, "The dashboard"). Plain JS, no build step, no library.
//
// Reads GET api/state (the gateway's own fleet view) every poll_s seconds while the tab is
// visible, and acts through the admin API (POST ../admin/models/{load,unload,pin,unpin}) with
// the same checks and errors as `cortex load`. The key typed into the page lives in
// sessionStorage only and is sent as an Authorization header; no cookie is ever set or sent.
// Every piece of data reaches the page through textContent or an attribute, never as HTML.
"use strict";
(() => {
  const KEY_STORE = "cortex.dashboard.key";
  const SVG = "http://www.w3.org/2000/svg";
  const ARM_MS = 5000;

  let key = sessionStorage.getItem(KEY_STORE) || "";
  let state = null;
  let pollS = 2;
  let timer = null;
  let polling = false;
  let pollAgain = false;
  let stopped = false; // waiting for a key
  const pending = new Set(); // actions in flight
  const armed = new Map(); // two-click actions: id -> expiry (ms)
  const chosenNode = new Map(); // catalogue model -> node picked for a load

  const $ = (id) => document.getElementById(id);

  // ---- DOM helpers: text only, never HTML ------------------------------------------------

  function h(tag, props, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "dataset") Object.assign(e.dataset, v);
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      e.append(kid instanceof Node ? kid : String(kid));
    }
    return e;
  }

  function s(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }

  function badge(text, cls) {
    return h("span", { class: `badge ${cls || text}` }, text);
  }

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  // ---- formatting (the same units as `cortex status`) ------------------------------------

  function bytes(n) {
    if (n === null || n === undefined) return "-";
    let v = Number(n);
    for (const unit of ["B", "KiB", "MiB", "GiB"]) {
      if (v < 1024 || unit === "GiB") {
        return unit === "B" || unit === "KiB" ? `${v.toFixed(0)} ${unit}` : `${v.toFixed(1)} ${unit}`;
      }
      v /= 1024;
    }
    return `${v.toFixed(1)} GiB`;
  }

  function duration(sec) {
    if (sec === null || sec === undefined) return "-";
    const t = Math.max(0, Math.round(sec));
    if (t < 60) return `${t}s`;
    if (t < 3600) return `${Math.floor(t / 60)}m ${String(t % 60).padStart(2, "0")}s`;
    return `${Math.floor(t / 3600)}h ${String(Math.floor((t % 3600) / 60)).padStart(2, "0")}m`;
  }

  function clock(unix) {
    const d = new Date(unix * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }

  function rate(v) {
    if (v === null || v === undefined) return "-";
    return v >= 100 ? v.toFixed(0) : v.toFixed(1);
  }

  function seconds(v) {
    if (v === null || v === undefined) return "-";
    return v < 1 ? `${Math.round(v * 1000)} ms` : `${v.toFixed(2)} s`;
  }

  function errorText(body, status) {
    const err = body && (body.error || body);
    if (err && typeof err === "object" && (err.message || err.code)) {
      return `${err.code || err.type || "error"}: ${err.message || ""} (HTTP ${status})`;
    }
    return `HTTP ${status}`;
  }

  // ---- notices ---------------------------------------------------------------------------

  let noticeTimer = null;
  function notice(kind, text) {
    const n = $("notice");
    n.className = `notice ${kind}`;
    n.textContent = text;
    n.dataset.kind = kind;
    n.hidden = false;
    clearTimeout(noticeTimer);
    if (kind === "ok") noticeTimer = setTimeout(() => { n.hidden = true; }, 8000);
  }

  // ---- polling ---------------------------------------------------------------------------

  function headers(extra) {
    const out = { Accept: "application/json", ...(extra || {}) };
    if (key) out.Authorization = `Bearer ${key}`;
    return out;
  }

  function schedule() {
    clearTimeout(timer);
    if (!document.hidden && !stopped) timer = setTimeout(poll, pollS * 1000);
  }

  async function poll() {
    if (polling) { pollAgain = true; return; }
    polling = true;
    clearTimeout(timer);
    try {
      const r = await fetch("api/state", { headers: headers(), cache: "no-store", credentials: "omit" });
      const body = await r.json().catch(() => null);
      if (r.status === 401 || r.status === 403) {
        needKey(errorText(body, r.status));
      } else if (!r.ok || !body) {
        connection(`the gateway answered ${errorText(body, r.status)}`, "failed");
      } else {
        stopped = false;
        $("auth-needed").hidden = true;
        state = body;
        pollS = body.dashboard.poll_s || 2;
        render();
        connection(`updated ${clock(body.at)}`, "");
      }
    } catch (e) {
      connection(`cannot reach the gateway (${e.message})`, "failed");
    } finally {
      polling = false;
    }
    if (pollAgain) { pollAgain = false; poll(); return; }
    schedule();
  }

  function connection(text, cls) {
    const u = $("updated");
    u.textContent = text;
    u.className = cls ? `badge ${cls}` : "muted";
  }

  function needKey(message) {
    stopped = true;
    $("auth-needed").hidden = false;
    $("auth-message").textContent = key ? `This key was refused: ${message}` : message;
    $("gateway-status").textContent = "key needed";
    $("gateway-status").className = "badge degraded";
    $("key-input").focus();
  }

  // ---- actions ---------------------------------------------------------------------------

  // a load's node is picked when it is clicked (a function): one id per model for it
  const actionId = (action, model, node) =>
    `${action}|${model}|${typeof node === "function" ? "" : node || ""}`;

  function isArmed(id) {
    const until = armed.get(id);
    return until !== undefined && until > Date.now();
  }

  function describe(action, model, body) {
    if (action === "load") {
      const where = (body.nodes || []).join(", ");
      return body.loaded ? `loaded ${body.model} on ${where}` : `${body.model} is already ready on ${where}`;
    }
    if (action === "unload") return `unloaded ${body.model} from ${(body.unloaded_from || []).join(", ")}`;
    const verb = action === "pin" ? "pinned" : "unpinned";
    return `${verb} ${body.model} (until the gateway restarts; models.toml keeps the lasting setting)`;
  }

  async function act(action, model, node) {
    const id = actionId(action, model, node);
    if (pending.has(id)) return;
    pending.add(id);
    armed.delete(id);
    render();
    const body = node ? { model, node } : { model };
    const request = fetch(`../admin/models/${action}`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
    setTimeout(poll, 200); // a load shows as loading while this request waits for it
    try {
      const r = await request;
      const answer = await r.json().catch(() => null);
      if (r.ok && answer) notice("ok", describe(action, model, answer));
      else notice("error", `${action} ${model} failed: ${errorText(answer, r.status)}`);
    } catch (e) {
      notice("error", `${action} ${model} failed: ${e.message}`);
    } finally {
      pending.delete(id);
    }
    poll();
  }

  function actionButton(action, label, model, node, opts) {
    const id = actionId(action, model, node);
    const two = opts && opts.confirm;
    const isPending = pending.has(id);
    const armedNow = two && isArmed(id);
    return h("button", {
      type: "button",
      class: `${two ? "danger" : ""} ${armedNow ? "armed" : ""}`.trim() || null,
      dataset: { action, model, node: node || "" },
      disabled: isPending,
      title: two ? `click twice to ${action}` : null,
      onclick: () => {
        if (two && !isArmed(id)) {
          armed.set(id, Date.now() + ARM_MS);
          setTimeout(render, ARM_MS + 50);
          render();
          return;
        }
        act(action, model, typeof node === "function" ? node() : node);
      },
    }, isPending ? `${label}…` : armedNow ? `confirm ${label}` : label);
  }

  // ---- charts ----------------------------------------------------------------------------

  // The charts' time axis: the last window_s (10 min), or less while the gateway has recorded
  // less (at least 12 steps), so a young gateway's first minutes are not a sliver at the edge.
  function chartSpan() {
    const d = state.dashboard;
    const starts = state.series.map((x) => x.at[0]).filter((t) => t !== undefined);
    const oldest = starts.length ? Math.min(...starts) : state.at;
    return Math.min(d.window_s, Math.max(state.at - oldest + d.step_s, 12 * d.step_s));
  }

  // What a chart's label says: the last minute (tokens generated per second over it, or the
  // mean time to first token of the steps that had one); "-" when nothing happened in it.
  const RECENT_S = 60;
  function recent(series, field) {
    if (!series) return null;
    const now = state.at;
    const step = state.dashboard.step_s;
    let tokens = 0, covered = 0, sum = 0, n = 0;
    series.at.forEach((t, i) => {
      if (now - t > RECENT_S) return;
      const v = series[field][i];
      const dt = i > 0 ? t - series.at[i - 1] : step;
      covered += dt;
      if (v !== null) { tokens += v * dt; sum += v; n += 1; }
    });
    if (field === "tokens_per_s") return covered > 0 && tokens > 0 ? tokens / Math.min(RECENT_S, covered) : null;
    return n ? sum / n : null;
  }

  function sparkline(series, field, cls, fmt) {
    const W = 110, H = 26;
    const wrap = h("div", { class: "chart", dataset: { chart: field } });
    const svg = s("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
    svg.append(s("line", { class: "spark-base", x1: 0, y1: H - 1, x2: W, y2: H - 1 }));
    if (series) {
      const now = state.at;
      const span = chartSpan();
      const gap = 3 * state.dashboard.step_s; // no sample for that long: the line breaks
      const values = series[field];
      const present = values.filter((v) => v !== null);
      const max = Math.max(...present, 1e-9);
      let run = [];
      const flush = () => {
        if (run.length === 1) {
          svg.append(s("circle", { class: `spark-line ${cls}`, cx: run[0][0], cy: run[0][1], r: 1.6 }));
        } else if (run.length > 1) {
          svg.append(s("polyline", { class: `spark-line ${cls}`, points: run.map((p) => p.join(",")).join(" ") }));
        }
        run = [];
      };
      series.at.forEach((t, i) => {
        const v = values[i];
        if (v === null || (i > 0 && t - series.at[i - 1] > gap)) flush();
        if (v === null) return;
        const x = Math.max(0, W * (1 - (now - t) / span));
        const y = H - 2 - (H - 5) * (v / max);
        run.push([x.toFixed(1), y.toFixed(1)]);
      });
      flush();
      const title = s("title");
      const what = field === "ttft_s" ? "mean time to first token" : "tokens generated per second";
      title.textContent = `${what} over the last ${duration(span)} (max ${fmt(present.length ? max : null)}); the label: the last minute`;
      svg.append(title);
    }
    const value = recent(series, field);
    wrap.append(svg, h("span", { class: "value", dataset: { value: value === null ? "" : value } }, fmt(value)));
    return wrap;
  }

  // ---- rendering -------------------------------------------------------------------------

  function render() {
    if (!state) return;
    const d = state.dashboard;
    const st = state.status;
    renderSummary(d, st);
    renderNodes(st.nodes);
    renderModels(st, d);
    renderCatalogue(d);
    renderErrors(st.errors || []);
    renderEvents(st.events || []);
  }

  function renderSummary(d, st) {
    const hl = state.health;
    const g = $("gateway-status");
    g.textContent = `gateway ${hl.status}`;
    g.className = `badge ${hl.status}`;
    $("nodes-up").textContent = `${hl.nodes_up}/${hl.nodes_total} nodes up`;
    $("nodes-up").dataset.up = hl.nodes_up;
    $("models-ready").textContent = `${hl.models_ready} model(s) ready`;
    const inFlight = st.nodes.reduce((a, n) => a + (n.in_flight || 0), 0);
    $("in-flight").textContent = `${inFlight} request(s) in flight`;
    const role = $("role");
    if (d.mode === "read-only") {
      role.textContent = "read-only dashboard";
      role.className = "badge muted";
    } else if (d.can_act) {
      role.textContent = d.role === "open" ? "admin (auth off)" : "admin key";
      role.className = "badge admin";
    } else {
      role.textContent = "read-only: an admin key can act";
      role.className = "badge muted";
    }
    role.dataset.role = d.role;
    role.dataset.canAct = String(d.can_act);
    $("key-form").hidden = !d.auth && !key;
    $("key-forget").hidden = !key;
    $("version").textContent = `cortex ${d.version}`;
  }

  function renderNodes(nodes) {
    const cards = nodes.map((n) => {
      const poisoned = n.devices.filter((dev) => dev.state === "poisoned").length;
      const head = h("div", { class: "node-head" },
        h("strong", {}, n.name),
        badge(n.up ? "up" : "down"),
        poisoned ? badge(`${poisoned} poisoned`, "poisoned") : null,
        h("span", { class: "endpoint muted" }, n.endpoint));
      const devices = n.devices.map((dev) => {
        const pct = dev.total_bytes > 0 ? Math.min(100, (100 * dev.used_bytes) / dev.total_bytes) : 0;
        const fillEl = h("div", { class: `fill ${pct >= 95 ? "full" : pct >= 80 ? "hi" : ""}`.trim() });
        fillEl.style.width = `${pct.toFixed(1)}%`;
        return h("div", {
          class: "device",
          dataset: { device: `${n.name}/${dev.key}`, used: dev.used_bytes, total: dev.total_bytes,
            queue: dev.queue_depth, state: dev.state },
        },
        h("span", { class: "name" }, dev.key),
        h("div", { class: "bar", title: `${dev.kind} memory used / total (the neuron's budget)` },
          fillEl, h("span", { class: "text mem-text" }, `${bytes(dev.used_bytes)} / ${bytes(dev.total_bytes)}`)),
        h("div", { class: "meta" },
          dev.state === "poisoned" ? badge("poisoned") : badge("ok"),
          h("span", { class: "queue" }, `queue ${dev.queue_depth}`),
          dev.max_queue ? h("span", {}, `requests ${dev.requests_in_progress}/${dev.max_queue}`) : null));
      });
      return h("div", { class: "card node", dataset: { node: n.name, up: String(n.up) } },
        head,
        !n.up && n.last_error ? h("div", { class: "node-error" }, n.last_error) : null,
        devices.length ? devices : h("div", { class: "muted" }, n.up ? "no devices reported" : "not seen yet"),
        h("div", { class: "node-foot muted" }, h("span", { class: "inflight" }, `${n.in_flight || 0} in flight`)));
    });
    $("nodes").replaceChildren(...cards);
  }

  function configured(id) {
    return state.profiles.some((p) => p.id === id);
  }

  function renderModels(st, d) {
    const series = new Map(state.series.map((x) => [`${x.model}|${x.node}`, x]));
    const rows = [...st.models]
      .sort((a, b) => a.id.localeCompare(b.id) || a.node.localeCompare(b.node))
      .map((m) => {
        const sr = series.get(`${m.id}|${m.node}`);
        let left = "-";
        if (m.pinned) left = "pinned";
        else if (m.keep_alive_s === null) left = "never";
        else if (m.keep_alive_left_s !== null) left = m.in_flight ? `${duration(m.keep_alive_s)} (busy)` : duration(m.keep_alive_left_s);
        const actions = [];
        if (d.can_act) {
          actions.push(actionButton("unload", "unload", m.id, m.node, { confirm: true }));
          if (configured(m.id)) {
            actions.push(m.pinned ? actionButton("unpin", "unpin", m.id) : actionButton("pin", "pin", m.id));
          }
        }
        return h("tr", { dataset: { model: m.id, node: m.node } },
          h("td", { class: "id", title: m.harness ? `harness ${m.harness}` : null }, m.id),
          h("td", { dataset: { field: "node" } }, m.node),
          h("td", { dataset: { field: "device" } }, m.device || "-"),
          h("td", { dataset: { field: "state" }, title: m.error ? errorText(m.error, "-") : null }, badge(m.state)),
          h("td", { class: "num", dataset: { field: "memory", bytes: m.memory_bytes } }, bytes(m.memory_bytes)),
          h("td", { class: "num", dataset: { field: "batch", running: m.running, waiting: m.waiting, maxBatch: m.max_batch },
            title: `${m.running} running, ${m.waiting} waiting, max_batch ${m.max_batch}` },
          `${m.running}/${m.max_batch}${m.waiting ? ` +${m.waiting} waiting` : ""}`),
          h("td", { class: "num", dataset: { field: "in_flight", value: m.in_flight } }, m.in_flight),
          h("td", { dataset: { field: "pinned", value: String(m.pinned) } }, m.pinned ? badge("pinned") : "-"),
          h("td", { class: "num", dataset: { field: "keep_alive" } }, left),
          h("td", {}, sparkline(sr, "tokens_per_s", "", rate)),
          h("td", {}, sparkline(sr, "ttft_s", "ttft", seconds)),
          h("td", {}, h("div", { class: "actions" }, actions)));
      });
    $("models").classList.toggle("no-actions", !d.can_act);
    fill($("models").tBodies[0], rows);
    $("models-empty").hidden = rows.length > 0;
    const loads = (st.loads_in_progress || []).map((id) =>
      h("div", { dataset: { loading: id } }, badge("loading"), " ", h("span", { class: "id" }, id), h("span", { class: "muted" }, " — placing and loading")));
    const failed = Object.entries(st.failed_loads || {}).map(([id, f]) =>
      h("div", { class: "failed", dataset: { failed: id } }, badge("failed"), ` ${id}: ${f.code}: ${f.message} (attempt ${f.attempts}, next try in ${duration(f.retry_in)})`));
    $("loads").replaceChildren(...loads, ...failed);
  }

  function renderCatalogue(d) {
    const active = document.activeElement;
    if (active && active.tagName === "SELECT" && $("catalogue").contains(active)) return; // do not close an open list
    const aliases = new Map();
    const rows = new Map();
    for (const e of state.catalogue) {
      if (e.alias_for) {
        if (!aliases.has(e.alias_for)) aliases.set(e.alias_for, []);
        aliases.get(e.alias_for).push(e.id);
        if (!rows.has(e.alias_for)) rows.set(e.alias_for, { ...e, id: e.alias_for, alias_for: null, synthetic: true });
      } else {
        rows.set(e.id, e);
      }
    }
    const upNodes = state.status.nodes.filter((n) => n.up).map((n) => n.name);
    const trs = [...rows.values()].sort((a, b) => a.id.localeCompare(b.id)).map((e) => {
      const actions = [];
      if (d.can_act) {
        const select = h("select", { "aria-label": `node for ${e.id}`, dataset: { nodeFor: e.id },
          onchange: (ev) => chosenNode.set(e.id, ev.target.value) },
          h("option", { value: "" }, "any node"),
          upNodes.map((n) => h("option", { value: n }, n)));
        select.value = chosenNode.get(e.id) || "";
        actions.push(select, actionButton("load", "load", e.id, () => select.value || null));
        if (configured(e.id)) {
          actions.push(e.pinned ? actionButton("unpin", "unpin", e.id) : actionButton("pin", "pin", e.id));
        }
      }
      const where = e.loaded_on.map((p) => `${p.node} (${p.state})`).join(", ");
      return h("tr", { dataset: { catalogue: e.id, state: e.state } },
        h("td", { class: "id" }, e.id),
        h("td", { dataset: { field: "aliases" } }, (aliases.get(e.id) || []).join(", ") || "-"),
        h("td", { dataset: { field: "state" }, title: e.error ? errorText(e.error, "-") : null }, badge(e.state)),
        h("td", { dataset: { field: "loaded_on" } }, where || "-"),
        h("td", { dataset: { field: "pinned", value: String(e.pinned) } }, e.pinned ? badge("pinned") : "-"),
        h("td", {}, h("div", { class: "actions" }, actions)));
    });
    $("catalogue").classList.toggle("no-actions", !d.can_act);
    fill($("catalogue").tBodies[0], trs);
  }

  function renderErrors(errors) {
    fill($("errors").tBodies[0], errors.map((e) => h("tr", { dataset: { code: e.code } },
      h("td", {}, clock(e.at)),
      h("td", {}, e.route),
      h("td", { class: "id wrap" }, e.model || "-"),
      h("td", {}, e.node),
      h("td", { class: "wrap", title: e.message || null },
        badge(e.code, "failed"), e.status ? ` ${e.status}` : "", e.message ? ` ${e.message}` : ""))));
    $("errors-empty").hidden = errors.length > 0;
  }

  function renderEvents(events) {
    fill($("events").tBodies[0], events.map((e) => h("tr", {},
      h("td", {}, clock(e.at)),
      h("td", {}, e.kind),
      h("td", { class: "id" }, e.model),
      h("td", {}, e.node),
      h("td", { title: e.error || null }, e.outcome === "failed" ? badge("failed") : e.outcome),
      h("td", { class: "num" }, e.duration_s === null ? "-" : `${e.duration_s.toFixed(1)}s`))));
    $("events-empty").hidden = events.length > 0;
  }

  // ---- start -----------------------------------------------------------------------------

  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const typed = $("key-input").value.trim();
    $("key-input").value = "";
    if (!typed) return;
    key = typed;
    sessionStorage.setItem(KEY_STORE, key);
    stopped = false;
    poll();
  });
  $("key-forget").addEventListener("click", () => {
    key = "";
    sessionStorage.removeItem(KEY_STORE);
    stopped = false;
    poll();
  });
  $("notice").addEventListener("click", () => { $("notice").hidden = true; });
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) clearTimeout(timer);
    else poll();
  });
  poll();
})();
