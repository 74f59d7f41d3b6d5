// Live updates for the console: the mcp_status watch stream (Server-Sent Events read with fetch,
// because EventSource cannot send the Authorization header), its long-poll form, and a plain poll
// of mcp_status when the backend has no watch. docs/api.md describes the stream; docs/web-console.md
// how the console uses it.

/** An incremental parser of the text/event-stream format (WHATWG HTML, "server-sent events"). */
export class SseParser {
  constructor(onEvent, onComment = () => {}) {
    this.onEvent = onEvent;
    this.onComment = onComment;
    this.buffer = '';
    this.reset();
  }

  reset() {
    this.event = '';
    this.data = [];
    this.id = null;
  }

  /** Feed decoded text; complete events are dispatched as they end (a blank line). */
  push(text) {
    this.buffer += text;
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      if (!match) return;
      // A lone \r at the end may be the first half of \r\n: wait for the next chunk.
      if (match[0] === '\r' && match.index === this.buffer.length - 1) return;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      this.line(line);
    }
  }

  line(line) {
    if (line === '') {
      if (this.data.length) this.onEvent({ event: this.event || 'message', data: this.data.join('\n'), id: this.id });
      this.reset();
      return;
    }
    if (line.startsWith(':')) { this.onComment(line.slice(1).trim()); return; }
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.event = value;
    else if (field === 'data') this.data.push(value);
    else if (field === 'id') this.id = value;
  }
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
});

/** A server answer the watch does not understand: it is an old backend, so poll instead. */
class Unsupported extends Error {}

/**
 * Keeps the console's list current.
 *  - `url`: mcp_status's URL; `headers()`: the Authorization and apikey headers (a fresh token each time);
 *  - `apply({servers, removed, snapshot, as_of})`: what changed (snapshot: the whole list);
 *  - `readAll()`: the whole list through mcp_status (for the poll fallback);
 *  - `onMode(mode, detail)`: 'stream' | 'longpoll' | 'poll' | 'reconnecting'.
 * Reconnects with `since=<cursor>` after `end` or a network error, and starts again from a snapshot on 410.
 */
export class Watcher {
  constructor({ url, headers, apply, readAll, onMode, pollMs = 2000, silenceMs = 45000 }) {
    Object.assign(this, { url, headers, apply, readAll, onMode, pollMs, silenceMs });
    this.cursor = null;
    this.controller = new AbortController();
  }

  stop() { this.controller.abort(); }

  get stopped() { return this.controller.signal.aborted; }

  async run() {
    let backoff = 0;
    while (!this.stopped) {
      try {
        await this.once();
        backoff = 0;
      } catch (error) {
        if (this.stopped) return;
        if (error instanceof Unsupported) { await this.poll(); return; }
        backoff = Math.min(backoff ? backoff * 2 : 500, 10000);
        this.onMode('reconnecting', error.message || String(error));
        await sleep(backoff, this.controller.signal);
      }
    }
  }

  async once() {
    const params = new URLSearchParams({ watch: 'true' });
    if (this.cursor) params.set('since', this.cursor);
    // One controller per connection, so a silent connection can be dropped without stopping the watcher.
    const connection = new AbortController();
    const stopAll = () => connection.abort();
    this.controller.signal.addEventListener('abort', stopAll, { once: true });
    try {
      const response = await fetch(`${this.url}?${params}`, {
        headers: { ...(await this.headers()), Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: connection.signal,
      });
      if (response.status === 410) { // the cursor is older than the change log: start again from a snapshot
        this.cursor = null;
        await response.body?.cancel();
        return;
      }
      const type = response.headers.get('content-type') || '';
      if (!response.ok) throw new Error(`mcp_status watch answered ${response.status}`);
      if (type.includes('text/event-stream')) {
        this.onMode('stream');
        await this.read(response, connection);
        return;
      }
      const body = await response.json();
      if (typeof body.cursor !== 'string') throw new Unsupported('no watch on this backend');
      this.onMode('longpoll');
      this.cursor = body.cursor;
      this.apply(body);
    } finally {
      this.controller.signal.removeEventListener('abort', stopAll);
    }
  }

  async read(response, connection) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let ended = false;
    const parser = new SseParser((message) => {
      if (message.id) this.cursor = message.id;
      let data = {};
      try { data = JSON.parse(message.data); } catch { return; }
      if (data.cursor) this.cursor = data.cursor;
      if (message.event === 'snapshot') this.apply({ ...data, snapshot: true });
      else if (message.event === 'changes') this.apply({ ...data, snapshot: false });
      else if (message.event === 'end') ended = true;
    });
    // Keep-alives arrive every ~15 s; a connection silent for much longer is dead (a proxy dropped it).
    let silence = setTimeout(() => connection.abort(), this.silenceMs);
    try {
      while (!ended) {
        const { value, done } = await reader.read();
        if (done) break;
        clearTimeout(silence);
        silence = setTimeout(() => connection.abort(), this.silenceMs);
        parser.push(decoder.decode(value, { stream: true }));
      }
    } finally {
      clearTimeout(silence);
      if (ended) await reader.cancel().catch(() => {});
    }
  }

  /** No watch on this backend: read the whole list every pollMs. */
  async poll() {
    while (!this.stopped) {
      try {
        const body = await this.readAll();
        this.onMode('poll');
        this.apply({ ...body, snapshot: true });
      } catch (error) {
        this.onMode('reconnecting', error.message || String(error));
      }
      await sleep(this.pollMs, this.controller.signal);
    }
  }
}
