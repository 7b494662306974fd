// The inspector page: plain DOM, no framework, no build step. It talks only to the proxy's documented REST API
// (/users, /memories/{user}/..., /sessions/{user}/...). Everything users said is shown with textContent: it is
// data, never markup. The token lives in this tab's sessionStorage and goes out only as an Authorization header.

const PAGE = 100; // items fetched per request
const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem("memory-proxy-token") || "",
  tenant: sessionStorage.getItem("memory-proxy-tenant") || "",
  user: null, // the user shown
  memories: [], memoriesAfter: null,
  sessionsAfter: null, usersAfter: null,
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// --- the API ------------------------------------------------------------------------------------------------

// Paths are relative to the page (<base>/ui/), so the page works behind a reverse proxy that adds a prefix.
const base = new URL("..", document.baseURI);
// A user id is one path segment whatever it holds ("team/alice", "a b", "."): encoded in full.
const segment = (id) => encodeURIComponent(id).replace(/\./g, "%2E");

async function api(method, path, { query, body } = {}) {
  const url = new URL(path, base);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  const headers = {};
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  if (state.token && state.tenant) headers["X-Memory-Tenant"] = state.tenant;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, { method, headers, cache: "no-store",
                                  body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    throw new ApiError(0, `could not reach the proxy (${error.message})`);
  }
  if (!response.ok) {
    let message = response.statusText || "request failed";
    try {
      const payload = await response.json();
      if (payload && payload.error && payload.error.message) message = payload.error.message;
    } catch { /* not JSON: keep the status text */ }
    throw new ApiError(response.status, message);
  }
  return response;
}

const getJSON = async (path, query) => (await api("GET", path, { query })).json();
const memoriesPath = (user, ...rest) => ["memories", segment(user), ...rest].join("/");
const sessionsPath = (user, ...rest) => ["sessions", segment(user), ...rest].join("/");

// --- small DOM helpers ----------------------------------------------------------------------------------------

// h("p", {className: "x", onclick: f}, "text", child): children are nodes or strings (always text nodes).
function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node) node[name] = value;
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function when(seconds) {
  if (seconds === null || seconds === undefined) return "";
  return new Date(seconds * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC";
}

function showError(error) {
  const box = $("error");
  const status = error instanceof ApiError && error.status ? `${error.status}: ` : "";
  box.textContent = status + (error.message || String(error));
  if (error instanceof ApiError && error.status === 401) {
    box.textContent += "\nEnter the admin token (or a proxy key) above and press Connect.";
  }
  box.hidden = false;
  $("notice").hidden = true;
}

function showNotice(text) {
  $("notice").textContent = text;
  $("notice").hidden = false;
  $("error").hidden = true;
}

function clearMessages() {
  $("error").hidden = true;
  $("notice").hidden = true;
}

// Run an action; any failure lands in the error banner (never a blank page, never an unhandled rejection).
function guarded(action) {
  return async (event) => {
    if (event && event.preventDefault) event.preventDefault();
    try {
      await action(event);
    } catch (error) {
      showError(error);
    }
  };
}

// --- connection -----------------------------------------------------------------------------------------------

function describeConnection(count) {
  const who = !state.token ? "without a token (this proxy's management API is open)"
    : state.tenant ? `with a token, tenant ${JSON.stringify(state.tenant)}` : "with a token";
  $("connection").textContent = `Connected ${who}. ${count} user${count === 1 ? "" : "s"} listed.`;
}

async function connect() {
  clearMessages();
  state.token = $("token").value.trim();
  state.tenant = $("tenant").value.trim();
  sessionStorage.setItem("memory-proxy-token", state.token);
  sessionStorage.setItem("memory-proxy-tenant", state.tenant);
  closeUser();
  await loadUsers(false);
}

async function disconnect() {
  sessionStorage.removeItem("memory-proxy-token");
  sessionStorage.removeItem("memory-proxy-tenant");
  $("token").value = "";
  $("tenant").value = "";
  await connect();
}

// --- users ----------------------------------------------------------------------------------------------------

async function loadUsers(more) {
  if (!more) {
    $("user-list").replaceChildren();
    state.usersAfter = null;
    $("connection").textContent = "";
  }
  let page;
  try {
    page = await getJSON("users", { limit: PAGE, prefix: $("user-prefix").value, after: state.usersAfter });
  } catch (error) {
    $("more-users").hidden = true;
    $("users-empty").hidden = true;
    $("connection").textContent = "Not connected.";
    throw error;
  }
  for (const user of page.data) {
    $("user-list").append(h("li", {}, h("button", {
      type: "button", dataset: { user: user.id }, onclick: guarded(() => openUser(user.id)),
      "aria-current": String(user.id === state.user),
    }, user.id)));
  }
  state.usersAfter = page.last_id;
  $("more-users").hidden = !page.has_more;
  const count = $("user-list").children.length;
  $("users-empty").hidden = count > 0;
  describeConnection(count);
}

function markCurrentUser() {
  for (const button of $("user-list").querySelectorAll("button")) {
    button.setAttribute("aria-current", String(button.dataset.user === state.user));
  }
}

function closeUser() {
  state.user = null;
  $("user").hidden = true;
  if (location.hash) history.replaceState(null, "", location.pathname + location.search);
  markCurrentUser();
}

async function openUser(user) {
  clearMessages();
  state.user = user;
  history.replaceState(null, "", `#user=${encodeURIComponent(user)}`);
  markCurrentUser();
  $("user-title").textContent = user;
  $("user").hidden = false;
  clearSearch();
  await Promise.all([loadMemories(false), loadSessions(false)]);
}

// --- memories -------------------------------------------------------------------------------------------------

async function loadMemories(more) {
  if (!more) {
    state.memories = [];
    state.memoriesAfter = null;
  }
  const user = state.user;
  const page = await getJSON(memoriesPath(user),
                             { limit: PAGE, include_history: "true", after: state.memoriesAfter });
  if (user !== state.user) return; // another user was opened meanwhile
  state.memories.push(...page.data);
  state.memoriesAfter = page.last_id;
  $("more-memories").hidden = !page.has_more;
  renderMemories();
}

// Active memories newest first, each with the older versions it replaced (its history); a superseded memory whose
// successor is not loaded (forgotten, or on a later page) is shown on its own.
function renderMemories() {
  const byId = new Map(state.memories.map((m) => [m.id, m]));
  const shownInHistory = new Set();
  const cards = [];
  for (const memory of state.memories) {
    if (memory.superseded_by && byId.has(memory.superseded_by)) continue;
    const history = [];
    for (let old = byId.get(memory.supersedes); old && !history.includes(old); old = byId.get(old.supersedes)) {
      history.push(old);
      shownInHistory.add(old.id);
    }
    cards.push([memory, history]);
  }
  const active = state.memories.filter((m) => !m.superseded_by).length;
  $("memory-count").textContent = `(${active} active${state.memories.length > active
    ? `, ${state.memories.length - active} earlier versions` : ""})`;
  $("memory-list").replaceChildren(...cards.map(([memory, history]) => memoryCard(memory, history)));
  $("memories-empty").hidden = cards.length > 0;
}

function memoryMeta(memory) {
  return h("p", { className: "meta" },
    h("span", { className: "category" }, memory.category),
    h("span", {}, `source: ${memory.source}`),
    h("span", { title: "created" }, `created ${when(memory.created_at)}`),
    memory.updated_at !== memory.created_at ? h("span", {}, `updated ${when(memory.updated_at)}`) : null,
    h("span", { className: "expiry" }, memory.expires_at ? `expires ${when(memory.expires_at)}` : "never expires"),
    memory.score !== undefined ? h("span", { className: "score" }, `score ${memory.score.toFixed(3)}`) : null,
    h("span", { className: "id" }, memory.id));
}

function memoryCard(memory, history = []) {
  const card = h("li", { className: "card memory" + (memory.superseded_by ? " superseded" : ""),
                         dataset: { id: memory.id } });
  const text = h("p", { className: "text" }, memory.text);
  const parts = [text, memoryMeta(memory)];
  if (memory.superseded_by) parts.push(h("p", { className: "meta" }, "superseded (an earlier version)"));
  if (history.length) {
    parts.push(h("details", { className: "history" },
      h("summary", {}, `${history.length} earlier version${history.length === 1 ? "" : "s"}`),
      h("ol", {}, history.map((old) => h("li", { dataset: { id: old.id } },
        h("span", { className: "text" }, old.text), " — ",
        h("span", { className: "meta" }, `${old.category}, ${old.source}, from ${when(old.created_at)}`))))));
  }
  const actions = h("div", { className: "actions" },
    h("button", { type: "button", className: "edit", onclick: () => editMemory(card, memory) }, "Edit"),
    h("button", { type: "button", className: "forget danger", onclick: guarded(() => forgetMemory(memory)) },
      "Forget"));
  card.append(...parts, actions);
  return card;
}

function editMemory(card, memory) {
  const text = h("textarea", { className: "edit-text", value: memory.text, required: true });
  const category = h("input", { className: "edit-category", type: "text", value: memory.category, size: 12 });
  const days = h("input", { className: "edit-expiry", type: "number", min: "0.001", step: "any", size: 6,
                            placeholder: "unchanged" });
  const form = h("form", {
    onsubmit: guarded(async () => {
      const patch = {};
      if (text.value !== memory.text) patch.text = text.value;
      if (category.value.trim() !== memory.category) patch.category = category.value.trim();
      if (days.value) patch.ttl_seconds = Number(days.value) * 86400;
      if (Object.keys(patch).length) {
        await api("PATCH", memoriesPath(state.user, memory.id), { body: patch });
        showNotice("Saved.");
      }
      await refresh();
    }),
  }, text, h("div", { className: "row" },
    h("label", {}, "Category ", category), h("label", {}, "Expires in (days) ", days),
    h("button", { type: "submit", className: "save" }, "Save"),
    h("button", { type: "button", className: "cancel", onclick: () => card.replaceWith(memoryCard(memory)) },
      "Cancel")));
  const fresh = h("li", { className: "card memory editing", dataset: { id: memory.id } }, form);
  card.replaceWith(fresh);
  text.focus();
}

async function forgetMemory(memory) {
  if (!window.confirm(`Forget this memory?\n\n${memory.text}`)) return;
  await api("DELETE", memoriesPath(state.user, memory.id));
  showNotice("Forgotten.");
  await refresh();
}

// After a change: the list again, and the search again if one is shown (its hits may have changed).
async function refresh() {
  await loadMemories(false);
  if (!$("results").hidden && $("search-query").value.trim()) await search();
}

// --- search ---------------------------------------------------------------------------------------------------

async function search() {
  const q = $("search-query").value.trim();
  if (!q) return clearSearch();
  const kind = $("search-kind").value;
  const user = state.user;
  const hits = (await getJSON(memoriesPath(user, "search"), { q, k: 10, kind })).data;
  if (user !== state.user) return;
  $("results-title").textContent = `${hits.length} ${kind === "memory" ? "memories" : "excerpts"} closest to `
    + JSON.stringify(q);
  $("result-list").replaceChildren(...hits.map((hit) => (kind === "memory" ? memoryCard(hit) : excerptCard(hit))));
  $("results").hidden = false;
  $("search-clear").hidden = false;
}

function clearSearch() {
  $("results").hidden = true;
  $("search-clear").hidden = true;
  $("result-list").replaceChildren();
}

function excerptCard(chunk) {
  return h("li", { className: "card excerpt" },
    h("p", { className: "text" }, chunk.text),
    h("p", { className: "meta" },
      h("span", {}, `session ${chunk.session}`),
      h("span", {}, `messages ${chunk.first_seq}–${chunk.last_seq}`),
      h("span", {}, when(chunk.created_at)),
      h("span", { className: "score" }, `score ${chunk.score.toFixed(3)}`)));
}

// --- sessions -------------------------------------------------------------------------------------------------

async function loadSessions(more) {
  if (!more) {
    $("session-list").replaceChildren();
    state.sessionsAfter = null;
  }
  const user = state.user;
  let page;
  try {
    page = await getJSON(sessionsPath(user), { limit: PAGE, after: state.sessionsAfter });
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) throw error;
    page = { data: [], has_more: false, last_id: null }; // conversation memory is not available on this store
  }
  if (user !== state.user) return;
  $("session-list").append(...page.data.map(sessionCard));
  state.sessionsAfter = page.last_id;
  $("more-sessions").hidden = !page.has_more;
  const count = $("session-list").children.length;
  $("session-count").textContent = count ? `(${count}${page.has_more ? "+" : ""})` : "";
  $("sessions-empty").hidden = count > 0;
}

function sessionCard(session) {
  const messages = h("ol", { className: "messages", hidden: true });
  const card = h("li", { className: "card session", dataset: { id: session.id } },
    h("p", { className: "text" }, session.id),
    h("p", { className: "meta" },
      h("span", {}, `${session.messages} message${session.messages === 1 ? "" : "s"} kept`),
      h("span", {}, `started ${when(session.created_at)}`),
      h("span", {}, `last turn ${when(session.updated_at)}`),
      h("span", {}, session.expires_at ? `expires ${when(session.expires_at)}` : "never expires")),
    session.summary ? h("details", {}, h("summary", {}, "summary of older turns"),
      h("p", { className: "text" }, session.summary)) : null,
    messages);
  const show = h("button", { type: "button", className: "show", onclick: guarded(async () => {
    if (!messages.hidden) {
      messages.hidden = true;
      show.textContent = "Show messages";
      return;
    }
    const detail = await getJSON(sessionsPath(state.user, segment(session.id)), { limit: 50 });
    messages.replaceChildren(...detail.data.map((m) => h("li", {},
      h("span", { className: "role" }, m.role), contentText(m.content))));
    messages.hidden = false;
    show.textContent = "Hide messages";
  }) }, "Show messages");
  const forget = h("button", { type: "button", className: "forget danger", onclick: guarded(async () => {
    if (!window.confirm(`Forget the conversation ${JSON.stringify(session.id)} and its excerpts?`)) return;
    await api("DELETE", sessionsPath(state.user, segment(session.id)));
    card.remove();
    showNotice("Conversation forgotten.");
  }) }, "Forget conversation");
  card.append(h("div", { className: "actions" }, show, forget));
  return card;
}

// A message's content as text: a string, the text of its parts, or (tool calls, images) its JSON.
function contentText(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) {
    return content.map((part) => (part && typeof part.text === "string" ? part.text : JSON.stringify(part)))
      .join("\n");
  }
  return content === null || content === undefined ? "" : JSON.stringify(content);
}

// --- export and erase -----------------------------------------------------------------------------------------

async function exportUser() {
  const response = await api("GET", memoriesPath(state.user, "export"));
  const blob = await response.blob();
  const link = h("a", { href: URL.createObjectURL(blob),
                        download: `memories-${state.user.replace(/[^\w.-]+/g, "_")}.jsonl` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  showNotice("Exported.");
}

function askErase() {
  $("erase-user").textContent = state.user;
  $("erase-confirm").value = "";
  $("erase-submit").disabled = true;
  $("erase-dialog").showModal();
  $("erase-confirm").focus();
}

async function erase() {
  const user = state.user;
  if ($("erase-confirm").value !== user) return;
  $("erase-dialog").close();
  const result = await (await api("DELETE", memoriesPath(user))).json();
  closeUser();
  showNotice(`Erased ${user}: ${result.deleted} memories and ${result.sessions_deleted ?? 0} conversations.`);
  for (const button of $("user-list").querySelectorAll("button")) {
    if (button.dataset.user === user) button.parentElement.remove();
  }
  $("users-empty").hidden = $("user-list").children.length > 0;
}

// --- wiring ---------------------------------------------------------------------------------------------------

function wire() {
  $("token").value = state.token;
  $("tenant").value = state.tenant;
  $("connect").addEventListener("submit", guarded(connect));
  $("disconnect").addEventListener("click", guarded(disconnect));
  let filterTimer;
  $("user-prefix").addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(guarded(() => loadUsers(false)), 250);
  });
  $("user-filter").addEventListener("submit", guarded(() => loadUsers(false)));
  $("more-users").addEventListener("click", guarded(() => loadUsers(true)));
  $("open-user").addEventListener("submit", guarded(async () => {
    const id = $("open-user-id").value.trim();
    if (id) await openUser(id);
  }));
  $("search").addEventListener("submit", guarded(search));
  $("search-clear").addEventListener("click", () => {
    $("search-query").value = "";
    clearSearch();
  });
  $("more-memories").addEventListener("click", guarded(() => loadMemories(true)));
  $("more-sessions").addEventListener("click", guarded(() => loadSessions(true)));
  $("export").addEventListener("click", guarded(exportUser));
  $("erase").addEventListener("click", askErase);
  $("erase-confirm").addEventListener("input", () => {
    $("erase-submit").disabled = $("erase-confirm").value !== state.user;
  });
  $("erase-cancel").addEventListener("click", () => $("erase-dialog").close());
  $("erase-form").addEventListener("submit", guarded(erase));
}

async function start() {
  wire();
  const wanted = new URLSearchParams(location.hash.slice(1)).get("user");
  try {
    await loadUsers(false);
  } catch (error) {
    showError(error);
    if (error instanceof ApiError && error.status === 401) $("token").focus();
    return;
  }
  if (wanted) await guarded(() => openUser(wanted))();
}

start();
