// sdswarm node page: polls the node's /api/ui/ endpoints and draws them. No framework, no network but the node.
// Everything the node relays from other peers is untrusted: it goes into the page as text, never as HTML.
"use strict";

const API = "/api/ui";
const POLL_MS = 3000;
const TOKEN_KEY = "sdswarm-admin-token";

const $ = (id) => document.getElementById(id);
const state = {
  since: 0, swarmSince: 0, local: [], rounds: [], swarm: [], charts: {}, samples: "", checkpoints: "",
  status: null, pendingAdmin: null, settingsLoaded: false,
};

// ---- the admin token: asked once, kept in this tab (sessionStorage) -----------------------------------------

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function takeTokenFromUrl() {
  // the console can print http://host:port/#token=...; the fragment never reaches a server log
  const match = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + "#dashboard");
  }
}

function askToken(message) {
  return new Promise((resolve) => {
    const dialog = $("token-dialog");
    $("token-input").value = "";
    showText($("token-error"), message || "");
    state.pendingAdmin = resolve;
    if (!dialog.open) dialog.showModal();
    $("token-input").focus();
  });
}

async function submitToken(event) {
  event.preventDefault();
  const value = $("token-input").value.trim();
  if (!value) { showText($("token-error"), "Paste the token first."); return; }
  const answer = await fetch(`${API}/admin`, { headers: { Authorization: `Bearer ${value}` } });
  if (!answer.ok) {
    showText($("token-error"), answer.status === 403 ? "That is not this node's admin token." :
      `The node answered ${answer.status}.`);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token-dialog").close();
  updateTokenButton();
  finishTokenPrompt(true);
}

function finishTokenPrompt(ok) {
  const resolve = state.pendingAdmin;
  state.pendingAdmin = null;
  if (resolve) resolve(ok);
}

function updateTokenButton() {
  $("btn-token").textContent = token() ? "Admin ✓" : "Admin token";
}

// ---- talking to the node -------------------------------------------------------------------------------------

async function getJSON(path) {
  const answer = await fetch(path, { cache: "no-store" });
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(body.error || `HTTP ${answer.status}`);
  return body;
}

// An admin call: with the token; asks for it (once) when the node says it is missing or wrong.
async function adminCall(path, body) {
  for (let attempt = 0; attempt < 2; attempt++) {
    if (!token() && !(await askToken())) return { ok: false, cancelled: true, body: {} };
    const answer = await fetch(path, {
      method: "POST",
      headers: { Authorization: `Bearer ${token()}`, "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    });
    const parsed = await answer.json().catch(() => ({}));
    if (answer.status === 401 || answer.status === 403) {
      sessionStorage.removeItem(TOKEN_KEY);
      updateTokenButton();
      if (!(await askToken(parsed.error))) return { ok: false, cancelled: true, body: parsed };
      continue;
    }
    return { ok: answer.ok, status: answer.status, body: parsed };
  }
  return { ok: false, body: { error: "the token was refused" } };
}

// ---- small helpers ---------------------------------------------------------------------------------------------

function showText(element, text) {
  element.textContent = text || "";
  element.hidden = !text;
}

function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  return digits === undefined ? value.toLocaleString() : value.toFixed(digits);
}

function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function ago(seconds) {
  if (typeof seconds !== "number") return "–";
  seconds = Math.max(0, seconds);
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 129600) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

function shortId(id) {
  id = String(id || "");
  return id.length > 16 ? `${id.slice(0, 6)}…${id.slice(-6)}` : id;
}

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function row(cells, classes) {
  const tr = document.createElement("tr");
  cells.forEach((cell, i) => {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell); else td.textContent = cell;
    if (classes && classes[i]) td.className = classes[i];
    tr.append(td);
  });
  return tr;
}

function fillTable(tbody, rows, emptyText, columns) {
  tbody.replaceChildren(...(rows.length ? rows : [row([emptyText])]));
  if (!rows.length) {
    tbody.firstChild.className = "empty";
    tbody.firstChild.firstChild.colSpan = columns;
  }
}

function safeLink(href, text) {
  // only the node's own API paths become links
  if (typeof href !== "string" || !href.startsWith(`${API}/`)) return el("span", "");
  return el("a", text, { href, download: "" });
}

function notice(text, kind) {
  const box = $("notice");
  box.textContent = text;
  box.className = `notice ${kind || ""}`;
  box.hidden = false;
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => { box.hidden = true; }, kind === "error" ? 10000 : 5000);
}

// ---- dashboard -------------------------------------------------------------------------------------------------

// "LoRA rank 32 · 18.9M params · 75.6 MB" or "full · 983.1M params · 3932.3 MB": what each averaging round carries
function trainingMode(training) {
  if (!training) return "–";
  const what = training.mode === "lora" ? `LoRA rank ${training.rank}` : "full fine-tune";
  return `${what} · ${fmt(training.parameters / 1e6, 1)}M params · ${fmt(training.megabytes, 1)} MB`;
}

function renderStatus(status) {
  state.status = status;
  const p = status.progress || {};
  const swarm = status.swarm || {};
  const badge = $("state");
  badge.textContent = status.state || "unknown";
  badge.dataset.state = status.state || "unknown";
  $("run-id").textContent = status.run_id || swarm.run_id || "";
  $("stat-step").textContent = fmt(p.step);
  $("stat-loss").textContent = fmt(p.loss_avg, 4);
  $("stat-sps").textContent = fmt(p.samples_per_second, 1);
  $("stat-swarm-sps").textContent = fmt(swarm.samples_per_second, 1);
  // swarm steps by hivemind's counters (its "epochs"): this node's local_epoch, the swarm's newest
  $("stat-swarm-step").textContent = `${fmt(p.local_epoch)} / ${fmt(swarm.epoch ?? p.swarm_epoch)}`;
  const peers = Array.isArray(swarm.peers) ? swarm.peers : [];
  $("stat-peers").textContent = fmt(peers.length);
  $("stat-mode").textContent = trainingMode(status.training);

  const target = swarm.target_batch_size || p.target_batch_size || 0;
  const toward = swarm.samples_toward_target ?? p.swarm_samples ?? 0;
  const share = target > 0 ? Math.min(100, (100 * toward) / target) : 0;
  $("progress-fill").style.width = `${share}%`;
  $("progress").setAttribute("aria-valuenow", share.toFixed(0));
  $("progress-text").textContent = target > 0
    ? `swarm step ${fmt(swarm.epoch ?? p.swarm_epoch)}: ${fmt(toward)} / ${fmt(target)} samples (${share.toFixed(1)}%)`
    : "–";

  const now = status.server_time || Date.now() / 1000;
  fillTable($("peers").tBodies[0], peers.map((peer) => {
    const id = el("span", shortId(peer.peer_id), { title: String(peer.peer_id || "") });
    const standing = peer.gone ? "gone" : (peer.state && peer.state !== "training" ? peer.state : "");
    const role = standing ? `${peer.role} · ${standing}` : peer.role;
    const rounds = (Array.isArray(peer.rounds) ? peer.rounds : []).slice(-6).map(roundMark).join(" ");
    const tr = row([id, role, peer.address || "–", fmt(peer.step), fmt(peer.loss, 4),
      fmt(peer.samples_per_second, 1), fmt(peer.local_epoch), fmt(peer.grad_norm, 3), rounds || "–",
      ago(now - peer.time)], [null, null, "mono", "num", "num", "num", "num", "num", "mono", null]);
    if (peer.gone) tr.className = "gone";
    return tr;
  }), "No peers reported yet.", 10);
  renderHealth(swarm);

  renderData(status.data);
  document.querySelectorAll(".controls button[data-action]").forEach((button) => {
    const action = button.dataset.action;
    button.disabled = (action === "start" && status.state !== "stopped")
      || (action !== "start" && status.state === "stopped");
  });
  renderJoin(status);
}

// a round in a few characters: g3 (gradients with 3 peers), p2~ (partial), g! (failed), g- (alone)
function roundMark(r) {
  const kind = String((r && r.kind) || "?").slice(0, 1);
  const outcome = r && r.outcome;
  if (outcome === "failed") return `${kind}!`;
  if (outcome === "alone") return `${kind}-`;
  return `${kind}${fmt(r.group_size)}${outcome === "partial" ? "~" : ""}`;
}

function renderHealth(swarm) {
  const counts = {};
  for (const r of state.rounds) counts[r.outcome] = (counts[r.outcome] || 0) + 1;
  const parts = ["complete", "partial", "failed", "alone"].filter((k) => counts[k]).map((k) => `${counts[k]} ${k}`);
  const spread = value(swarm.spread);
  const model = spread === null ? "one model: not known yet"
    : spread <= 1 ? `one model (spread ${spread.toFixed(2)} steps' worth)`
      : `peers drifted apart (spread ${spread.toFixed(2)} steps' worth)`;
  $("health-text").textContent = `${model}; this node's rounds: ${parts.join(", ") || "none yet"}`;
}

const DATA_LABELS = {
  pairs_ready: "pairs ready for training", pairs_fetched: "pairs fetched", pairs_cached: "pairs from the cache",
  chunks: "chunks prepared", bytes_fetched: "downloaded", cache_pairs: "pairs in the cache",
  cache_bytes: "cache size", waited_s: "training waited for data (s)",
  rejected_posts: "posts remembered as rejected", skipped_rejected: "rejected posts skipped unfetched",
  last_rejected: "newest rejections (post: reason)",
};

function renderData(data) {
  const rows = [];
  for (const [key, value] of Object.entries(data || {})) {
    const label = DATA_LABELS[key] || key.replaceAll("_", " ");
    if (Array.isArray(value)) {  // e.g. the newest rejections, "post id: reason"
      if (!value.length) continue;
      rows.push(row([label, ""], [null, "num"]));
      value.forEach((line) => rows.push(row([`· ${line}`, ""], ["sub", "num"])));
    } else if (value && typeof value === "object") {
      const entries = Object.entries(value);
      const total = entries.reduce((sum, [, n]) => sum + (typeof n === "number" ? n : 0), 0);
      rows.push(row([label, fmt(total)], [null, "num"]));
      entries.sort((a, b) => (b[1] || 0) - (a[1] || 0))
        .forEach(([reason, n]) => rows.push(row([`· ${reason}`, fmt(n)], ["sub", "num"])));
    } else {
      const shown = key.endsWith("bytes") || key === "bytes_fetched" ? bytes(value)
        : typeof value === "number" && !Number.isInteger(value) ? fmt(value, 1) : fmt(value);
      rows.push(row([label, shown], [null, "num"]));
    }
  }
  fillTable($("data").tBodies[0], rows, "No data counters yet.", 2);
}

function renderCheckpoints(list) {
  const key = JSON.stringify(list.map((c) => [c.name, c.single_file]));
  if (key === state.checkpoints) return;
  state.checkpoints = key;
  const now = Date.now() / 1000;
  fillTable($("checkpoints").tBodies[0], list.map((c) => {
    const links = el("span", null, { class: "links" });
    links.append(safeLink(c.zip, "model .zip"), safeLink(c.zip_with_state, `+ state (${bytes(c.state_bytes)})`));
    if (c.single_file) links.append(safeLink(c.single_file, `.safetensors (${bytes(c.single_file_bytes)})`));
    return row([c.name, ago(now - c.time), bytes(c.model_bytes), links], [null, null, "num", null]);
  }), "No checkpoint yet.", 4);
}

function renderSamples(list) {
  const key = list.map((s) => s.name).join();
  if (key === state.samples) return;
  state.samples = key;
  const box = $("samples");
  if (!list.length) { box.replaceChildren(el("p", "No sample grid yet.", { class: "muted" })); return; }
  box.replaceChildren(...list.filter((s) => String(s.url).startsWith(`${API}/`)).map((s) => {
    const figure = el("figure");
    const link = el("a", null, { href: s.url, target: "_blank", rel: "noopener" });
    link.append(el("img", null, { src: s.url, alt: `sample grid at step ${s.step}`, loading: "lazy" }));
    figure.append(link, el("figcaption", `step ${fmt(s.step)}`));
    return figure;
  }));
}

function renderLog(lines) {
  const log = $("log");
  log.textContent = lines.length ? lines.join("\n") : "(no log lines yet)";
  if ($("log-follow").checked) log.scrollTop = log.scrollHeight;
}

// ---- charts (uPlot) -------------------------------------------------------------------------------------------

function chartWidth(id) { return Math.max(280, $(id).clientWidth); }

function makeChart(id, series, yLabel) {
  const options = {
    width: chartWidth(id), height: 240,
    scales: { x: { time: true } },
    series: [{}, ...series],
    axes: [{}, { label: yLabel, size: 60 }],
    legend: { live: true },
    cursor: { drag: { x: true, y: false } },
  };
  return new uPlot(options, [[], ...series.map(() => [])], $(id));
}

function setupCharts() {
  if (typeof uPlot === "undefined") return; // the page still works without charts
  state.charts.loss = makeChart("chart-loss", [
    { label: "loss (this node)", stroke: "#c7d2fe", width: 1, spanGaps: true },
    { label: "loss avg (this node)", stroke: "#4f46e5", width: 2, spanGaps: true },
    { label: "swarm (mean of peers)", stroke: "#ea580c", width: 2, spanGaps: true },
  ], "loss");
  state.charts.speed = makeChart("chart-speed", [
    { label: "this node", stroke: "#0891b2", width: 2, spanGaps: true },
    { label: "swarm", stroke: "#16a34a", width: 2, spanGaps: true },
  ], "samples/s");
  const dots = { paths: () => null, points: { show: true, size: 7 } };
  state.charts.rounds = makeChart("chart-rounds", [
    { label: "gradients (MB sent)", stroke: "#4f46e5", ...dots },
    { label: "parameters (MB sent)", stroke: "#16a34a", ...dots },
    { label: "DiLoCo outer (MB sent)", stroke: "#ca8a04", ...dots },
    { label: "failed", stroke: "#dc2626", ...dots },
  ], "MB");
  window.addEventListener("resize", () => {
    for (const [name, chart] of Object.entries(state.charts)) {
      chart.setSize({ width: chartWidth(`chart-${name}`), height: 240 });
    }
  });
}

function value(x) { return typeof x === "number" && Number.isFinite(x) ? x : null; }

function drawCharts() {
  if (!state.charts.loss) return;
  const local = state.local;
  const swarm = state.swarm;
  const localTable = [local.map((r) => r.time), local.map((r) => value(r.loss)),
    local.map((r) => value(r.loss_avg)), local.map((r) => value(r.samples_per_second))];
  const swarmTable = [swarm.map((r) => r.time), swarm.map((r) => value(r.loss)),
    swarm.map((r) => value(r.samples_per_second))];
  // one x axis for both: uPlot.join merges the two time bases, gaps where a series has no point
  const joined = uPlot.join([localTable, swarmTable]);
  state.charts.loss.setData([joined[0], joined[1], joined[2], joined[4]]);
  state.charts.speed.setData([joined[0], joined[3], joined[5]]);
  // how many loss points are drawn: for a reader of the page (and its browser test), not only the canvas
  $("chart-loss").dataset.points = String(joined[2].filter((v) => v !== null && v !== undefined).length);
  const rounds = state.rounds;
  const sent = (kind) => rounds.map((r) => (r.kind === kind && r.outcome !== "failed" ? value(r.bytes_sent) / 1e6 : null));
  state.charts.rounds.setData([rounds.map((r) => r.time), sent("gradients"), sent("parameters"),
    sent("outer"), rounds.map((r) => (r.outcome === "failed" ? 0 : null))]);
  $("chart-rounds").dataset.points = String(rounds.length);
  $("loss-note").textContent = swarm.some((r) => r.loss !== null) ? ""
    : "The swarm's loss appears once peers publish theirs.";
}

async function pollHistory() {
  const answer = await getJSON(`${API}/history?since=${state.since}&swarm_since=${state.swarmSince}`);
  if (answer.local.length) {
    // metrics.jsonl holds the trainer's records ("step"), averaging rounds ("round") and swarm steps
    state.local.push(...answer.local.filter((r) => "step" in r));
    state.rounds.push(...answer.local.filter((r) => r.round && typeof r.round === "object")
      .map((r) => ({ ...r.round, time: r.time })));
    state.since = answer.local[answer.local.length - 1].time;
  }
  if (answer.swarm.length) {
    state.swarm.push(...answer.swarm);
    state.swarmSince = answer.swarm[answer.swarm.length - 1].time;
  }
  if (answer.local.length || answer.swarm.length || !state.drawn) { drawCharts(); state.drawn = true; }
}

// ---- polling --------------------------------------------------------------------------------------------------

async function poll() {
  const jobs = [
    getJSON(`${API}/status`).then(renderStatus),
    pollHistory(),
    getJSON(`${API}/log?lines=200`).then((a) => renderLog(a.lines)),
    getJSON(`${API}/checkpoints`).then((a) => renderCheckpoints(a.checkpoints)),
    getJSON(`${API}/samples?limit=4`).then((a) => renderSamples(a.samples)),
  ];
  const results = await Promise.allSettled(jobs);
  const failed = results.find((r) => r.status === "rejected");
  if (failed && results.every((r) => r.status === "rejected")) {
    $("state").textContent = "unreachable";
    $("state").dataset.state = "unknown";
  }
  document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
}

async function pollForever() {
  try { await poll(); } catch (error) { console.warn(error); }
  setTimeout(pollForever, document.hidden ? POLL_MS * 4 : POLL_MS);
}

// ---- controls --------------------------------------------------------------------------------------------------

const CONTROL_TEXT = {
  start: "Training starts from the newest checkpoint.",
  stop: "Stopping: a checkpoint is written first, then training stops. The page stays up.",
  checkpoint: "A checkpoint is saved at the next step; it appears in the list when written.",
};

async function control(action) {
  if (action === "stop" && !confirm("Stop training? A checkpoint is written first.")) return;
  const answer = await adminCall(`${API}/control/${action}`);
  if (answer.cancelled) return;
  if (answer.ok) notice(CONTROL_TEXT[action], "ok");
  else notice(answer.body.error || `the node refused: HTTP ${answer.status}`, "error");
  setTimeout(poll, 500);
}

// ---- relay settings --------------------------------------------------------------------------------------------

const PORT_FIELDS = ["ie_port_internal", "ie_port_external", "dht_port_internal", "dht_port_external"];

async function loadSettings() {
  const view = await getJSON(`${API}/settings`);
  fillSettings(view);
  state.settingsLoaded = true;
}

function fillSettings(view) {
  const s = view.settings;
  const form = $("settings-form");
  form.querySelectorAll("input[name=mode]").forEach((r) => { r.checked = r.value === s.mode; });
  for (const key of ["public_address", "listen_host", ...PORT_FIELDS]) {
    form.elements[key].value = s[key] === null || s[key] === undefined ? "" : s[key];
    const description = view.fields && view.fields[key] && view.fields[key].description;
    if (description) form.elements[key].title = description;
  }
  updateModeFields();
  const after = $("after-restart");
  const a = view.after_restart || {};
  after.replaceChildren(
    el("dt", "join command"), el("dd", a.join_command || "none (client mode)"),
    el("dt", "DHT listens on"), el("dd", (a.dht_listen || []).join(", ") || "–"),
    el("dt", "DHT announces"), el("dd", (a.dht_announce || []).join(", ")
      || (s.mode === "client" ? "nothing: a client dials out" : "what it listens on")),
  );
}

function updateModeFields() {
  const client = $("settings-form").querySelector("input[name=mode][value=client]").checked;
  document.querySelectorAll(".relay-only").forEach((f) => f.classList.toggle("dimmed", client));
}

function readSettingsForm() {
  const form = $("settings-form");
  const mode = form.querySelector("input[name=mode]:checked");
  const changes = { mode: mode ? mode.value : null };
  changes.public_address = form.elements.public_address.value.trim() || null;
  changes.listen_host = form.elements.listen_host.value.trim();
  for (const key of PORT_FIELDS) {
    const raw = form.elements[key].value.trim();
    // an empty external port means "the same as internal": null; anything else is for the node to judge
    changes[key] = raw === "" ? null : /^-?\d+$/.test(raw) ? Number(raw) : raw;
  }
  return changes;
}

function clearSettingsErrors() {
  showText($("settings-error"), "");
  document.querySelectorAll("[data-error-for]").forEach((e) => showText(e, ""));
  document.querySelectorAll("#settings-form [aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
}

function showSettingsErrors(body) {
  showText($("settings-error"), body.error || "The node refused these settings.");
  const parts = String(body.error || "").replace(/^node settings:\s*/, "").split("; ");
  for (const key of body.keys || []) {
    const input = $("settings-form").elements[key];
    if (input && input.setAttribute) input.setAttribute("aria-invalid", "true");
    const part = parts.find((p) => p.includes(`'${key}'`));
    const slot = document.querySelector(`[data-error-for="${key}"]`);
    if (slot && part) showText(slot, part);
  }
}

async function saveSettings(event) {
  event.preventDefault();
  clearSettingsErrors();
  showText($("settings-saved"), "");
  const answer = await adminCall(`${API}/settings`, readSettingsForm());
  if (answer.cancelled) return;
  if (!answer.ok) { showSettingsErrors(answer.body); return; }
  fillSettings(answer.body);
  showText($("settings-saved"), "Saved. Applied when the node restarts.");
}

function renderJoin(status) {
  const command = status.join_command;
  $("join-command").textContent = command || "–";
  $("join-command-dash").textContent = command || "";
  $("join-strip").hidden = !command;
  $("copy-join").disabled = !command;
  $("join-note").textContent = command ? "" : "This node is a client: friends join through a relay's address.";
  const list = $("announced");
  const announced = Array.isArray(status.announced) ? status.announced : [];
  const key = announced.join();
  if (list.dataset.key === key && list.childElementCount) return;
  list.dataset.key = key;
  list.replaceChildren(...(announced.length ? announced.map((a) => el("li", a, { class: "mono" }))
    : [el("li", "none yet", { class: "muted" })]));
}

async function copyJoin(event) {
  const button = event.currentTarget;
  const text = $("join-command").textContent;
  try {
    await navigator.clipboard.writeText(text); // only in a secure context (https or localhost)
  } catch {
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 1500);
}

// ---- views -------------------------------------------------------------------------------------------------------

function showView() {
  const view = location.hash === "#settings" ? "settings" : "dashboard";
  $("view-dashboard").hidden = view !== "dashboard";
  $("view-settings").hidden = view !== "settings";
  document.querySelectorAll(".tabs a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
  if (view === "settings" && !state.settingsLoaded) loadSettings().catch((e) => notice(String(e), "error"));
  if (view === "dashboard") {
    for (const [name, chart] of Object.entries(state.charts)) {
      chart.setSize({ width: chartWidth(name === "loss" ? "chart-loss" : "chart-speed"), height: 240 });
    }
  }
}

function init() {
  takeTokenFromUrl();
  updateTokenButton();
  setupCharts();
  showView();
  window.addEventListener("hashchange", showView);
  document.querySelectorAll(".controls button[data-action]").forEach((button) => {
    button.addEventListener("click", () => control(button.dataset.action));
  });
  $("btn-token").addEventListener("click", () => askToken());
  $("token-form").addEventListener("submit", submitToken);
  $("token-cancel").addEventListener("click", () => { $("token-dialog").close(); });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    updateTokenButton();
    $("token-dialog").close();
  });
  $("token-dialog").addEventListener("close", () => finishTokenPrompt(Boolean(token())));
  $("settings-form").addEventListener("submit", saveSettings);
  $("settings-form").querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", updateModeFields));
  $("copy-join").addEventListener("click", copyJoin);
  $("copy-join-dash").addEventListener("click", copyJoin);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
  loadSettings().catch(() => {});
  pollForever();
}

document.addEventListener("DOMContentLoaded", init);
