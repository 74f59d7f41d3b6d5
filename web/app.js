// The web console: sign in with Supabase auth, list toolboxes and MCP servers, deploy, manage,
// and keep everything current without reloading. Static files, no build step: supabase-js is the
// UMD bundle from node_modules (window.supabase); config.json says where everything is
// (docs/web-console.md).
import { Watcher } from './watch.js';
import { ago, el, errorContent, serverRow, toolboxRow } from './view.js';

const $ = (id) => document.getElementById(id);
const MODES = {
  connecting: 'connecting…',
  stream: 'live: watch stream',
  longpoll: 'live: long-poll',
  realtime: 'live: Realtime',
  poll: 'updating every 2 s',
  reconnecting: 'reconnecting…',
};
const TOOLBOX_REFRESH_MS = 5000;

const state = {
  config: null,
  client: null,
  functions: null, // a FunctionsClient on config.functionsUrl (docs/web-app.md)
  session: null,
  watcher: null,
  channel: null,
  servers: new Map(),
  rows: new Map(),
  toolboxes: [],
  heard: new Map(), // toolbox id -> newest heartbeat time (ms) seen in any answer
  clockOffsetMs: 0, // the backend's clock minus this browser's, from each answer's as_of
  confirming: null,
  busy: new Set(),
  openTimelines: new Set(),
  timers: [],
};

// --- the backend -------------------------------------------------------------------------------------
function functionName(name) {
  return (state.config.functionNames || {})[name] || name;
}

function functionsUrl() {
  return state.config.functionsUrl.replace(/\/+$/, '');
}

async function authHeaders() {
  const { data } = await state.client.auth.getSession();
  const token = data.session?.access_token;
  if (!token) throw new Error('signed out');
  return { Authorization: `Bearer ${token}`, apikey: state.config.supabaseAnonKey };
}

/** An error of supabase-js's functions client as the API said it: {status, code, message, details}. */
async function apiError(error) {
  const response = error?.context;
  if (response && typeof response.json === 'function') {
    try {
      const body = await response.clone().json();
      if (body?.error?.message) return { status: response.status, ...body.error };
    } catch { /* not JSON: fall through */ }
    return { status: response.status, code: 'http_error', message: `the server answered ${response.status}` };
  }
  return { status: 0, code: 'unreachable', message: `could not reach the functions at ${functionsUrl()}: `
    + `${error?.message || error}. Check your connection and try again.` };
}

async function invoke(name, { path = '', method = 'POST', body } = {}) {
  const { data, error } = await state.functions.invoke(`${functionName(name)}${path}`, { method, body });
  if (error) throw await apiError(error);
  return data;
}

async function readAll() {
  const servers = [];
  let cursor = null;
  let asOf = null;
  do {
    const query = new URLSearchParams({ limit: '100' });
    if (cursor) query.set('cursor', cursor);
    const page = await invoke('mcp_status', { method: 'GET', path: `?${query}` });
    servers.push(...page.servers);
    cursor = page.next_cursor;
    asOf = page.as_of;
  } while (cursor);
  return { servers, as_of: asOf };
}

// --- what the person sees -----------------------------------------------------------------------------
function announce(text) {
  const region = $('announcer');
  region.append(el('p', { text }));
  while (region.childElementCount > 5) region.firstElementChild.remove();
}

function setMode(mode, detail) {
  const live = $('live');
  live.dataset.mode = mode;
  live.textContent = MODES[mode] || mode;
  live.title = detail || '';
  document.body.dataset.live = mode;
}

function noteClock(asOf) {
  const at = Date.parse(asOf);
  if (!Number.isNaN(at)) state.clockOffsetMs = at - Date.now();
}

/** Remember a toolbox's newest heartbeat time: a server row is re-sent only when the server changes, so its
 *  copy of the toolbox's heartbeat ages while the toolbox listing (re-read every few seconds) stays current. */
function noteHeard(toolboxId, at) {
  const ms = Date.parse(at || '');
  if (toolboxId && !Number.isNaN(ms) && !(state.heard.get(toolboxId) >= ms)) state.heard.set(toolboxId, ms);
}

/** Every "last heard" on the page, recomputed from its timestamp each second (no request needed). */
function tick() {
  const now = Date.now() + state.clockOffsetMs;
  for (const node of document.querySelectorAll('[data-heard-at]')) {
    const own = Date.parse(node.dataset.heardAt);
    const newest = state.heard.get(node.dataset.toolboxId);
    const at = newest !== undefined && !(own > newest) ? newest : own;
    node.textContent = `${node.dataset.prefix || ''}${Number.isNaN(at) ? 'never' : ago((now - at) / 1000)}`;
  }
}

function renderServer(server) {
  const row = serverRow(server, {
    onAction: runAction,
    onConfirm: confirmRemove,
    confirming: state.confirming === server.id,
    busy: state.busy.has(server.id),
    openTimelines: state.openTimelines,
  });
  const old = state.rows.get(server.id);
  const focused = old?.contains(document.activeElement) ? document.activeElement.dataset.action : null;
  if (old) old.replaceWith(row); else $('servers').tBodies[0].append(row);
  state.rows.set(server.id, row);
  if (focused) row.querySelector(`[data-action="${focused}"]:not(:disabled)`)?.focus();
}

function order() {
  const body = $('servers').tBodies[0];
  const sorted = [...state.servers.values()].sort((a, b) => (b.created_at || '').localeCompare(a.created_at || '')
    || a.name.localeCompare(b.name));
  // Rows move only when the order changed: moving a row would take the keyboard focus away from its buttons.
  const current = [...body.rows];
  if (sorted.some((server, i) => current[i] !== state.rows.get(server.id))) {
    for (const server of sorted) body.append(state.rows.get(server.id));
  }
  $('servers-count').textContent = `(${sorted.length})`;
  $('servers-empty').hidden = sorted.length > 0;
}

function removeServer(id, announceIt = true) {
  const server = state.servers.get(id);
  state.servers.delete(id);
  state.rows.get(id)?.remove();
  state.rows.delete(id);
  if (server && announceIt) announce(`${server.name} removed`);
}

/** A watch answer, a poll, or an action's answer: `servers` changed (or, with `snapshot`, are all there is). */
function apply({ servers = [], removed = [], snapshot = false, as_of: asOf }) {
  if (asOf) noteClock(asOf);
  if (snapshot) {
    const seen = new Set(servers.map((s) => s.id));
    for (const id of [...state.servers.keys()]) if (!seen.has(id)) removeServer(id);
  }
  for (const id of removed) removeServer(id);
  for (const server of servers) {
    const before = state.servers.get(server.id);
    state.servers.set(server.id, server);
    noteHeard(server.toolbox?.id, server.toolbox?.last_heartbeat_at);
    renderServer(server);
    if (before && before.effective_status !== server.effective_status) {
      announce(`${server.name}: ${before.effective_status} → ${server.effective_status}`
        + (server.effective_status === 'error' && server.error ? `. ${server.error}` : ''));
    } else if (!before && !snapshot) {
      announce(`${server.name}: ${server.effective_status}`);
    }
  }
  order();
  tick();
  document.body.dataset.loaded = 'true'; // the list has been shown at least once (tests and bench/web_console.py)
  if (servers.length || removed.length) scheduleToolboxes();
}

// --- toolboxes ----------------------------------------------------------------------------------------
let toolboxTimer = null;
function scheduleToolboxes(delay = 300) {
  clearTimeout(toolboxTimer);
  toolboxTimer = setTimeout(loadToolboxes, delay);
}

async function loadToolboxes() {
  let boxes;
  try {
    const body = await invoke('mcp_status', { method: 'GET', path: '/toolboxes' });
    boxes = body.toolboxes;
    if (body.as_of) noteClock(body.as_of);
  } catch {
    // A backend without the listing: what the servers say about their toolboxes.
    const seen = new Map();
    for (const s of state.servers.values()) {
      const box = s.toolbox || {};
      const entry = seen.get(box.id) || { id: box.id, name: box.name, status: box.status, stale: s.stale,
        last_heartbeat_at: box.last_heartbeat_at, docker_healthy: box.docker_healthy, server_count: 0,
        accepts_deploys: box.status === 'active' };
      entry.server_count += 1;
      seen.set(box.id, entry);
    }
    boxes = [...seen.values()];
  }
  state.toolboxes = boxes;
  for (const box of boxes) noteHeard(box.id, box.last_heartbeat_at);
  const body = $('toolboxes').tBodies[0];
  body.replaceChildren(...boxes.map(toolboxRow));
  $('toolboxes-empty').hidden = boxes.length > 0;
  const select = $('d-toolbox');
  const chosen = select.value;
  select.replaceChildren(...boxes.map((box) => el('option', {
    value: box.id, text: `${box.name || box.id} (${box.stale ? 'silent' : box.status})`,
  })));
  const keep = boxes.find((b) => b.id === chosen) || boxes.find((b) => b.accepts_deploys !== false);
  if (keep) select.value = keep.id;
  tick();
}

// --- actions ------------------------------------------------------------------------------------------
function showError(target, error, prefix = '', useName = null) {
  target.replaceChildren(...errorContent(error, prefix, useName).filter(Boolean));
  target.dataset.code = error.code || '';
  target.hidden = false;
}

function confirmRemove(id) {
  state.confirming = id;
  for (const server of state.servers.values()) renderServer(server);
  const row = id ? state.rows.get(id) : null;
  row?.querySelector('[data-action="confirm-remove"]')?.focus();
}

async function runAction(server, action) {
  $('action-error').hidden = true;
  state.confirming = null;
  state.busy.add(server.id);
  renderServer(server);
  try {
    const answer = action === 'remove'
      ? await invoke('manage_mcp_server', { method: 'DELETE', path: `/${server.id}` })
      : await invoke('manage_mcp_server', { path: `/${server.id}/${action}` });
    state.busy.delete(server.id);
    if (answer?.status === 'removed') {
      removeServer(server.id);
      order();
      if (answer.left_on_toolbox) announce(answer.left_on_toolbox);
    } else if (answer?.id) {
      apply({ servers: [answer] });
    } else {
      renderServer(state.servers.get(server.id) || server);
    }
  } catch (error) {
    state.busy.delete(server.id);
    renderServer(state.servers.get(server.id) || server);
    showError($('action-error'), error, `${action} ${server.name}: `);
  }
}

/** mcp_status?refresh=true: the agents are read and the MCP endpoints checked now (docs/api.md). */
async function refreshNow() {
  const button = $('refresh');
  button.disabled = true;
  $('action-error').hidden = true;
  try {
    const body = await invoke('mcp_status', { method: 'GET', path: '?refresh=true&limit=100' });
    apply({ servers: body.servers, as_of: body.as_of });
    announce('read the toolboxes now');
  } catch (error) {
    showError($('action-error'), error, 'refresh: ');
  } finally {
    button.disabled = false;
  }
}

function envRow() {
  const n = document.querySelectorAll('.env-row').length + 1;
  const row = el('div', { class: 'env-row' },
    el('div', { class: 'field' }, el('label', { for: `env-name-${n}`, text: `Variable ${n} name` }),
      el('input', { id: `env-name-${n}`, class: 'env-name', autocomplete: 'off', spellcheck: 'false',
        placeholder: 'API_KEY' })),
    el('div', { class: 'field' }, el('label', { for: `env-value-${n}`, text: `Variable ${n} value (secret)` }),
      el('input', { id: `env-value-${n}`, class: 'env-value', type: 'password', autocomplete: 'new-password' })),
    el('div', { class: 'field' }, el('button', { type: 'button', class: 'secondary', text: 'Remove value',
      'aria-label': `Remove variable ${n}`, onclick: () => { row.remove(); $('env-add').focus(); } })));
  $('env-rows').append(row);
  return row;
}

function deployBody() {
  const value = (id) => $(id).value.trim();
  const env = {};
  for (const row of document.querySelectorAll('.env-row')) {
    const name = row.querySelector('.env-name').value.trim();
    if (name) env[name] = row.querySelector('.env-value').value;
  }
  const body = {
    toolbox_id: $('d-toolbox').value,
    name: value('d-name'),
    image: value('d-image'),
    transport: $('d-transport').value,
    publish: $('d-publish').value,
    endpoint_path: value('d-endpoint') || '/mcp',
    env,
  };
  const port = (id) => (value(id) === '' ? undefined : Number(value(id)));
  if (port('d-container-port') !== undefined) body.container_port = port('d-container-port');
  if (port('d-host-port') !== undefined) body.host_port = port('d-host-port');
  return body;
}

const FIELD_INPUTS = { name: 'd-name', image: 'd-image', toolbox_id: 'd-toolbox', container_port: 'd-container-port',
  host_port: 'd-host-port', endpoint_path: 'd-endpoint', transport: 'd-transport', publish: 'd-publish' };

async function deploy(event) {
  event.preventDefault();
  const form = $('deploy-form');
  const error = $('deploy-error');
  error.hidden = true;
  $('deploy-ok').hidden = true;
  for (const input of form.querySelectorAll('[aria-invalid]')) input.removeAttribute('aria-invalid');
  const submit = $('deploy-submit');
  submit.disabled = true;
  try {
    const server = await invoke('deploy_mcp_server', { body: deployBody() });
    apply({ servers: [server] });
    $('deploy-ok').textContent = `${server.name} is ${server.effective_status}; it appears in the list below.`;
    $('deploy-ok').hidden = false;
    // Secret values leave the page once: cleared as soon as they were sent.
    for (const input of form.querySelectorAll('.env-value')) input.value = '';
    $('d-name').value = '';
  } catch (failure) {
    showError(error, failure, '', (name) => {
      $('d-name').value = name;
      $('d-name').removeAttribute('aria-invalid');
      $('d-name').focus();
    });
    const field = String(failure.details?.field || '').split(/[.[]/)[0];
    const input = FIELD_INPUTS[field] && $(FIELD_INPUTS[field]);
    if (input) input.setAttribute('aria-invalid', 'true');
    error.focus?.();
  } finally {
    submit.disabled = false;
  }
}

// --- live updates -------------------------------------------------------------------------------------
function startLive() {
  if (state.config.realtime) {
    startRealtime();
    return;
  }
  state.watcher = new Watcher({
    url: `${functionsUrl()}/${functionName('mcp_status')}`,
    headers: authHeaders,
    apply,
    readAll,
    onMode: setMode,
  });
  state.watcher.run();
}

/** Supabase Realtime, the subscriptions docs/realtime.md gives: `mcp_server_changes` carries every change of
 *  the person's servers (removals included); a row is a signal to re-read that server through mcp_status,
 *  which alone computes effective status and health. A silent toolbox writes nothing, so the whole list is
 *  also re-read every 15 s (the watch stream does this by itself). */
async function refreshServer(id) {
  try {
    const body = await invoke('mcp_status', { method: 'GET', path: `?id=${encodeURIComponent(id)}` });
    apply({ servers: [body.server], as_of: body.as_of });
  } catch (error) {
    if (error.status === 404) { removeServer(id); order(); } else setMode('reconnecting', error.message);
  }
}

function startRealtime() {
  const user = state.session.user.id;
  const rereadAll = async () => {
    try { apply({ ...(await readAll()), snapshot: true }); } catch (error) { setMode('reconnecting', error.message); }
  };
  state.channel = state.client.channel(`mcp-servers:${user}`)
    .on('postgres_changes', { event: 'INSERT', schema: 'public', table: 'mcp_server_changes',
      filter: `user_id=eq.${user}` }, (msg) => {
      if (msg.new.kind === 'removed') { removeServer(msg.new.instance_id); order(); } else refreshServer(msg.new.instance_id);
    })
    .on('postgres_changes', { event: 'UPDATE', schema: 'public', table: 'account_tool_environments',
      filter: `user_id=eq.${user}` }, () => scheduleToolboxes())
    .subscribe((status) => {
      setMode(status === 'SUBSCRIBED' ? 'realtime' : 'reconnecting', status);
      if (status === 'SUBSCRIBED') rereadAll(); // whatever happened before the subscription began
    });
  state.timers.push(setInterval(rereadAll, 15000));
}

// --- signing in and out -------------------------------------------------------------------------------
function showSignIn() {
  $('app').hidden = true;
  $('who').hidden = true;
  $('sign-in').hidden = false;
  $('sign-in-hint').textContent = state.config.signInHint || '';
  if (state.config.defaultEmail && !$('email').value) $('email').value = state.config.defaultEmail;
  ($('email').value ? $('password') : $('email')).focus();
}

async function signIn(event) {
  event.preventDefault();
  const error = $('sign-in-error');
  error.hidden = true;
  const { data, error: failure } = await state.client.auth.signInWithPassword({
    email: $('email').value.trim(), password: $('password').value,
  });
  $('password').value = '';
  if (failure) {
    showError(error, { message: failure.message || 'sign-in failed', code: failure.code });
    return;
  }
  showApp(data.session);
}

function showApp(session) {
  state.session = session;
  state.functions.setAuth(session.access_token);
  $('sign-in').hidden = true;
  $('who').hidden = false;
  $('who-email').textContent = `Signed in as ${session.user?.email || session.user?.id}`;
  $('app').hidden = false;
  setMode('connecting');
  loadToolboxes();
  startLive();
  state.timers.push(setInterval(tick, 1000), setInterval(loadToolboxes, TOOLBOX_REFRESH_MS));
  $('main').focus();
}

async function signOut() {
  state.watcher?.stop();
  state.watcher = null;
  if (state.channel) await state.client.removeChannel(state.channel);
  state.channel = null;
  for (const timer of state.timers) clearInterval(timer);
  state.timers = [];
  for (const id of [...state.servers.keys()]) removeServer(id, false);
  delete document.body.dataset.loaded;
  await state.client.auth.signOut();
  showSignIn();
}

async function boot() {
  try {
    const response = await fetch('config.json', { cache: 'no-store' });
    if (!response.ok) throw new Error(`config.json answered ${response.status}`);
    state.config = await response.json();
    if (!window.supabase?.createClient) throw new Error('supabase-js did not load (is web/node_modules installed?)');
    state.client = window.supabase.createClient(state.config.supabaseUrl, state.config.supabaseAnonKey, {
      auth: { persistSession: true, autoRefreshToken: true, detectSessionInUrl: false },
    });
    // The functions may live elsewhere than <supabaseUrl>/functions/v1 (Google Cloud: docs/web-app.md), so
    // the console calls them through a FunctionsClient of its own on config.functionsUrl. The UMD bundle
    // does not export the class; supabase.functions is an instance of it.
    state.config.functionsUrl ||= `${state.config.supabaseUrl.replace(/\/+$/, '')}/functions/v1`;
    const FunctionsClient = state.client.functions.constructor;
    state.functions = new FunctionsClient(functionsUrl(), { headers: { apikey: state.config.supabaseAnonKey } });
  } catch (error) {
    $('boot').hidden = true;
    $('fatal').textContent = `The console cannot start: ${error.message}.`;
    $('fatal').hidden = false;
    return;
  }
  $('boot').hidden = true;
  $('sign-in-form').addEventListener('submit', signIn);
  $('sign-out').addEventListener('click', signOut);
  $('refresh').addEventListener('click', refreshNow);
  $('deploy-form').addEventListener('submit', deploy);
  $('env-add').addEventListener('click', () => envRow().querySelector('input').focus());
  // Every call carries the person's current access token: reported at once, after sign-in and after each refresh.
  state.client.auth.onAuthStateChange((event, session) => {
    state.functions.setAuth(session ? session.access_token : '');
    if (event === 'SIGNED_OUT' && !$('app').hidden) signOut();
  });
  const { data } = await state.client.auth.getSession();
  if (data.session) showApp(data.session); else showSignIn();
}

window.mcpConsole = state; // for the browser tests and for poking at it from the devtools
boot();
