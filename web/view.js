// Rendering: DOM built with textContent only (servers' own text is never HTML, docs/api.md), and
// every status shown as a word plus a symbol, never by colour alone.

export const SYMBOLS = {
  running: '✓', healthy: '✓', active: '✓', ready: '✓',
  error: '✕', unhealthy: '✕', failed: '✕',
  deploying: '↻', pending_deploy: '↻', starting: '↻', stopping: '↻', deleting: '↻',
  stopped: '■', degraded: '!', unresponsive: '!',
  unknown: '?', stale: '?', unchecked: '–',
};

/** What each action may start from (shared/core/lifecycle.py ACTIONS), by stored status. */
const ACTIONS = {
  start: new Set(['stopped', 'error']),
  stop: new Set(['running']),
  restart: new Set(['running', 'stopped', 'error']),
  remove: new Set(['running', 'stopped', 'error']),
};

export function allowedActions(server) {
  const allowed = {};
  for (const [action, from] of Object.entries(ACTIONS)) {
    // An agent that forgot the container cannot stop, start or restart it; removing the record still works.
    allowed[action] = from.has(server.status) && (action === 'remove' || server.managed_by_agent !== false);
  }
  return allowed;
}

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key === 'dataset') {
      for (const [name, item] of Object.entries(value)) if (item !== undefined) node.dataset[name] = item;
    }
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

export function badge(word, kind, extra = {}) {
  return el('span', { class: `badge ${kind}`, text: word.replaceAll('_', ' '), dataset: { symbol: SYMBOLS[word] || '•' },
    ...extra });
}

/** "5 s ago", "2 min ago", "3 h ago", from seconds. */
export function ago(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return 'never';
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** A span whose text the clock keeps current: "last heard 2 min ago". */
export function heard(at, prefix = 'last heard ', toolboxId = undefined) {
  return el('span', { class: 'heard', dataset: { heardAt: at || '', prefix, toolboxId },
    text: `${prefix}${at ? '' : 'never'}` });
}

function time(at) {
  const date = new Date(at);
  return Number.isNaN(date.getTime()) ? String(at) : date.toLocaleTimeString();
}

function mcpCell(server) {
  const mcp = server.mcp || {};
  if (mcp.ready === true) {
    const tools = mcp.tool_count === null || mcp.tool_count === undefined ? '' : ` · ${mcp.tool_count} tools`;
    return [badge('ready', 'm-ready', { 'data-field': 'mcp' }), el('span', { class: 'sub', text: tools })];
  }
  if (mcp.ready === false) {
    return [badge('failed', 'm-failed', { 'data-field': 'mcp' }),
      el('div', { class: 'sub', text: mcp.error || 'the MCP endpoint does not answer' })];
  }
  return [badge('unchecked', 'm-unchecked', { 'data-field': 'mcp' }),
    mcp.error ? el('div', { class: 'sub', text: mcp.error }) : null];
}

function timeline(server, openTimelines) {
  const events = server.progress || [];
  const details = el('details', { class: 'progress', open: openTimelines.has(server.id) },
    el('summary', { text: `Progress (${events.length})` }),
    el('ol', { class: 'timeline', 'aria-label': `Progress of ${server.name}` },
      events.map((e) => el('li', {},
        el('time', { datetime: e.at, text: time(e.at) }), ' ',
        el('span', { text: `${e.from ? `${e.from} → ` : ''}${e.to}` }),
        e.message ? el('span', { class: 'sub', text: ` — ${e.message}` }) : null,
        e.source ? el('span', { class: 'sub', text: ` (${e.source})` }) : null))));
  details.addEventListener('toggle', () => {
    if (details.open) openTimelines.add(server.id); else openTimelines.delete(server.id);
  });
  return details;
}

/**
 * One server's row. `onAction(server, action)` runs an action; `confirming` is the id whose removal
 * is being confirmed (the row then shows "Yes, remove" / "Cancel" instead of the four buttons).
 */
export function serverRow(server, { onAction, onConfirm, confirming, busy, openTimelines }) {
  const allowed = allowedActions(server);
  const name = server.name;
  const box = server.toolbox || {};
  let actions;
  if (confirming) {
    actions = [
      el('span', { text: `Remove ${name}?` }),
      el('button', { type: 'button', class: 'danger', 'data-action': 'confirm-remove', text: 'Yes, remove',
        onclick: () => onAction(server, 'remove') }),
      el('button', { type: 'button', class: 'secondary', 'data-action': 'cancel-remove', text: 'Cancel',
        onclick: () => onConfirm(null) }),
    ];
  } else {
    actions = ['start', 'stop', 'restart', 'remove'].map((action) => el('button', {
      type: 'button', class: action === 'remove' ? 'danger' : 'secondary', 'data-action': action,
      'aria-label': `${action[0].toUpperCase()}${action.slice(1)} ${name}`,
      text: action[0].toUpperCase() + action.slice(1),
      disabled: busy || !allowed[action],
      title: allowed[action] ? undefined : `not possible while ${server.status.replaceAll('_', ' ')}`
        + (server.managed_by_agent === false && action !== 'remove' ? ' and not managed by the agent' : ''),
      onclick: () => (action === 'remove' ? onConfirm(server.id) : onAction(server, action)),
    }));
  }
  const effective = server.effective_status;
  return el('tr', { dataset: { serverId: server.id, name, status: effective } },
    el('td', {},
      el('div', { class: 'server-name', text: name }),
      el('div', { class: 'sub', text: `${server.image || '(no image)'} · on ${box.name || box.id || '?'}` }),
      server.endpoint ? el('div', { class: 'sub', text: server.endpoint }) : null,
      timeline(server, openTimelines)),
    el('td', {},
      badge(effective, `s-${effective}`, { 'data-field': 'status' }),
      server.status !== effective ? el('div', { class: 'sub', text: `recorded: ${server.status.replaceAll('_', ' ')}` })
        : null,
      server.managed_by_agent === false
        ? el('div', {}, el('span', { class: 'badge unmanaged', 'data-field': 'unmanaged', dataset: { symbol: '⚠' },
          text: 'agent no longer manages this container' })) : null,
      server.error ? el('div', { class: 'error-text', 'data-field': 'error', text: server.error }) : null),
    el('td', {}, badge(server.health, `h-${server.health}`, { 'data-field': 'health' })),
    el('td', {}, mcpCell(server)),
    el('td', {}, heard(box.last_heartbeat_at, '', box.id),
      server.stale ? el('div', {}, badge('stale', 't-stale')) : null),
    el('td', {}, el('div', { class: 'actions', role: 'group', 'aria-label': `Actions for ${name}` }, actions)));
}

export function toolboxRow(box) {
  const kind = box.stale ? 't-stale' : (box.status === 'active' ? 't-active'
    : box.status === 'unresponsive' ? 't-unresponsive' : box.status.startsWith('error') ? 't-error' : 't-other');
  const docker = box.docker_healthy === null || box.docker_healthy === undefined ? 'unknown'
    : (box.docker_healthy ? 'answering' : 'not answering');
  return el('tr', { dataset: { toolboxId: box.id, name: box.name || '' } },
    el('td', {}, el('div', { class: 'server-name', text: box.name || box.id }),
      el('div', { class: 'sub', text: box.public_address || '' })),
    el('td', {}, badge(box.stale ? 'stale' : box.status, kind, { 'data-field': 'status' }),
      box.stale ? el('div', { class: 'sub', text: `recorded: ${box.status}` }) : null),
    el('td', {}, heard(box.last_heartbeat_at, '', box.id)),
    el('td', { text: docker }),
    el('td', { text: String(box.server_count ?? '') }),
    el('td', { class: 'sub', text: box.liveness || '' }));
}

/** An API error as the person should read it: the sentence, every problem, and any suggestion. */
export function errorContent(error, prefix = '', useName = null) {
  const details = error.details || {};
  const problems = Array.isArray(details.problems) ? details.problems.filter((p) => !error.message.includes(p)) : [];
  const name = details.suggested_name;
  return [
    el('p', { 'data-field': 'message', text: `${prefix}${error.message}` }),
    problems.length ? el('ul', {}, problems.map((p) => el('li', { text: p }))) : null,
    name && useName ? el('p', {}, el('button', { type: 'button', class: 'secondary', 'data-field': 'suggestion',
      text: `Use the name ${name}`, onclick: () => useName(name) })) : null,
  ];
}
