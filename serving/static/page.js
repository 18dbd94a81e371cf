// The towerrec page: plain JS over the same JSON endpoints any client uses.
"use strict";

const $ = (id) => document.getElementById(id);
let session = [];

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error(`the server does not answer (${err.message})`);
  }
  let body = null;
  try { body = await response.json(); } catch (err) { /* not JSON */ }
  if (!response.ok) {
    let detail = body && body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg).join("; ");
    throw new Error(detail || `${response.status} ${response.statusText}`);
  }
  return body;
}

function itemLabel(item) {
  const span = document.createElement("span");
  span.className = "item title";
  span.textContent = item.title || item.item_id;
  span.title = item.item_id;
  span.dataset.itemId = item.item_id;
  span.addEventListener("click", () => showSimilar(item.item_id).catch((e) => showError(e.message)));
  return span;
}

// Items put since the export (GET /live), marked wherever they are listed.
let liveItems = new Map();

function badge(status) {
  const span = document.createElement("span");
  span.className = `badge ${status}`;
  span.textContent = status;
  return span;
}

function fillList(list, items, extra) {
  list.replaceChildren();
  for (const item of items) {
    const li = document.createElement("li");
    li.dataset.itemId = item.item_id;
    li.append(itemLabel(item));
    if (liveItems.has(item.item_id)) li.append(badge(liveItems.get(item.item_id)));
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = extra(item);
    li.append(meta);
    list.append(li);
  }
}

const scoreText = (item) => `${item.item_id} · ${item.score.toFixed(3)}`;

function markOverlap(a, b) {
  const inA = new Set([...a.children].map((li) => li.dataset.itemId));
  const inB = new Set([...b.children].map((li) => li.dataset.itemId));
  for (const li of a.children) li.classList.toggle("overlap", inB.has(li.dataset.itemId));
  for (const li of b.children) li.classList.toggle("overlap", inA.has(li.dataset.itemId));
}

async function loadLive() {
  const live = await api("/live");
  liveItems = new Map(live.recent.filter((c) => c.status !== "withdrawn").map((c) => [c.item_id, c.status]));
  $("live-summary").textContent = live.database
    ? `${live.live_items} put, ${live.withdrawn} withdrawn, ${live.events} events${live.error ? " · database error: " + live.error : ""}`
    : "(no database: read-only catalog)";
  const list = $("live-changes");
  list.replaceChildren();
  for (const change of live.recent) {
    const li = document.createElement("li");
    li.dataset.itemId = change.item_id;
    li.className = change.status;
    if (change.status === "withdrawn") {
      const span = document.createElement("span");
      span.className = "title";
      span.textContent = change.title || change.item_id;
      li.append(span);
    } else {
      li.append(itemLabel({item_id: change.item_id, title: change.title}));
    }
    li.append(badge(change.status));
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = [change.item_id, change.category, change.brand].filter(Boolean).join(" · ");
    li.append(meta);
    list.append(li);
  }
}

async function loadStatus() {
  const v = await api("/versions");
  const split = v.ab_split ? ` · A/B split ${Object.entries(v.ab_split).map(([k, s]) => `v${k} ${s}`).join(", ")}` : "";
  $("status").textContent = `default version ${v.default_version} · loaded ${v.loaded_versions.join(", ")}${split}`;
  const select = $("compare-version");
  const keep = select.value;
  select.replaceChildren(new Option("none", ""));
  for (const version of v.loaded_versions) select.append(new Option(`version ${version}`, version));
  select.value = keep;
  const users = await api("/users?limit=50");
  $("user-ids").replaceChildren(...users.user_ids.map((u) => new Option(u)));
}

async function showUser() {
  showError("");
  const user = $("user-input").value.trim();
  if (!user) return;
  const query = `k=10&rerank=${$("rerank").checked}&exclude_seen=${$("exclude-seen").checked}`;
  const path = `/recommendations/${encodeURIComponent(user)}`;
  const recs = await api(`${path}?${query}`);
  const history = await api(`/users/${encodeURIComponent(user)}/history?limit=50&version=${recs.model_version}`);
  fillList($("history"), history.history, (h) => `${h.item_id} · ${h.event_type}`);
  $("recs-a-title").textContent = `Recommendations (version ${recs.model_version})`;
  fillList($("recs-a"), recs.recommendations, scoreText);
  const other = $("compare-version").value;
  $("recs-b-column").hidden = !other;
  if (other) {
    const b = await api(`${path}?${query}&version=${other}`);
    $("recs-b-title").textContent = `Version ${b.model_version}`;
    fillList($("recs-b"), b.recommendations, scoreText);
    markOverlap($("recs-a"), $("recs-b"));
  } else {
    for (const li of $("recs-a").children) li.classList.remove("overlap");
  }
}

async function showSimilar(itemId) {
  showError("");
  const body = await api(`/items/${encodeURIComponent(itemId)}/similar?k=10`);
  $("similar-of").textContent = itemId;
  fillList($("similar"), body.similar, scoreText);
  $("similar-section").hidden = false;
  $("similar-section").scrollIntoView({ behavior: "smooth" });
}

async function refreshSession() {
  fillList($("session"), session.map((id) => ({ item_id: id, title: id })), () => "");
  if (!session.length) { $("session-recs").replaceChildren(); return; }
  const body = await api("/recommendations", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ history: session, k: 10, rerank: $("rerank").checked,
                           exclude_seen: $("exclude-seen").checked }),
  });
  fillList($("session-recs"), body.recommendations, scoreText);
  if (body.unknown_items.length) showError(`not in the catalog: ${body.unknown_items.join(", ")}`);
}

function addToSession(itemId) {
  session.push(itemId);
  refreshSession().catch((e) => showError(e.message));
}

let searchTimer = null;
async function search() {
  const q = $("search-input").value.trim();
  const list = $("search-results");
  if (!q) { list.replaceChildren(); return; }
  const body = await api(`/items?q=${encodeURIComponent(q)}&limit=10`);
  list.replaceChildren();
  for (const item of body.items) {
    const li = document.createElement("li");
    const add = document.createElement("button");
    add.type = "button";
    add.textContent = "add";
    add.addEventListener("click", () => addToSession(item.item_id));
    li.append(add, itemLabel(item));
    list.append(li);
  }
  if (!body.items.length) list.textContent = "no item matches";
}

$("user-form").addEventListener("submit", (event) => {
  event.preventDefault();
  showUser().catch((e) => showError(e.message));
});
$("compare-version").addEventListener("change", () => showUser().catch((e) => showError(e.message)));
$("search-input").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => search().catch((e) => showError(e.message)), 200);
});
$("session-ids").addEventListener("change", () => {
  session = $("session-ids").value.split(",").map((s) => s.trim()).filter(Boolean);
  refreshSession().catch((e) => showError(e.message));
});
$("session-clear").addEventListener("click", () => {
  session = [];
  $("session-ids").value = "";
  refreshSession().catch((e) => showError(e.message));
});
loadStatus().catch((e) => {
  $("status").textContent = "not ready";
  showError(`server not ready: ${e.message}`);
});
loadLive().catch(() => {});
setInterval(() => loadLive().catch(() => {}), 3000);
