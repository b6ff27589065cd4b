// The console's only way to the server: the public HTTP API, as any other client uses it.
//
// The token lives in this tab only (sessionStorage: it survives a reload and is gone with the
// tab); it travels in the Authorization header of each request, never in a URL, and is never
// written to the browser's console.

import { frameScheduler } from "./dom.js";

const TOKEN_KEY = "flowstate.console.token";

let token = sessionStorage.getItem(TOKEN_KEY);
const unauthorizedListeners = new Set();

/** The error of a failed request: the server's `{"error": {"type", "message"}}`. */
export class ApiError extends Error {
  constructor(status, type, message, body = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.body = body;
  }

  /** "not_found: no state 'x'" */
  toString() {
    return `${this.type}: ${this.message}`;
  }
}

export function hasToken() {
  return token !== null;
}

export function setToken(value) {
  token = value;
  if (value === null) sessionStorage.removeItem(TOKEN_KEY);
  else sessionStorage.setItem(TOKEN_KEY, value);
}

/** Call `listener(error)` whenever the server refuses the token (401). */
export function onUnauthorized(listener) {
  unauthorizedListeners.add(listener);
}

function headers(extra = {}) {
  const result = { Accept: "application/json", ...extra };
  if (token !== null) {
    // The server compares the token's UTF-8 bytes; a header value is a string of bytes.
    const bytes = new TextEncoder().encode(token);
    result.Authorization = `Bearer ${String.fromCharCode(...bytes)}`;
  }
  return result;
}

/** A path (relative to the page, so that the console works under any base path) and query. */
export function url(path, query = {}) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value === null || value === undefined || value === "") continue;
    for (const item of Array.isArray(value) ? value : [value]) params.append(key, String(item));
  }
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

/** One path segment: a state id such as "orders/7" becomes "orders%2F7". */
export function segment(value) {
  return encodeURIComponent(value);
}

async function errorOf(response) {
  const text = await response.text().catch(() => "");
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // Not JSON (a proxy's page, say): the status line says what happened.
  }
  const info = body && body.error ? body.error : null;
  const error = info
    ? new ApiError(response.status, info.type, info.message, body)
    : new ApiError(response.status, `http_${response.status}`, response.statusText || text.slice(0, 200));
  if (response.status === 401) for (const listener of unauthorizedListeners) listener(error);
  return error;
}

function networkError(cause) {
  return new ApiError(0, "unreachable", `cannot reach the server (${cause.message || cause})`);
}

/**
 * Call a JSON route: `await api("api/v1/states", {query: {limit: 50}})`.
 * Throws ApiError (the server's error, or "unreachable"); an aborted call throws AbortError.
 */
export async function api(path, { method = "GET", query = {}, body, signal, public: open } = {}) {
  const init = { method, signal, cache: "no-store", headers: open ? {} : headers() };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(url(path, query), init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw networkError(error);
  }
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/** Wait `ms`, or less when `signal` aborts. */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}

/**
 * A watch stream (`GET /api/v1/watch`, Server-Sent Events) read with fetch, so that the token
 * goes in a header (EventSource cannot send one). Versions are handed over in batches, at most
 * one batch per animation frame. After a drop it reconnects with `Last-Event-ID` and resumes
 * right after the last revision it saw.
 *
 *   const stream = new WatchStream({label: ["kind=order"], latest_only: true}, {
 *     onStates(states) {...}, onStatus({state, error, retryIn}) {...}});
 *   stream.close();
 */
export class WatchStream {
  constructor(query, { onStates, onStatus = () => {}, lastEventId = null }) {
    this.query = query;
    this.onStates = onStates;
    this.onStatus = onStatus;
    this.lastEventId = lastEventId; // set: resume right after this revision
    // The last event id of what onStates was given: versions parsed but not handed over yet
    // (they wait for the next frame) come after it.
    this.deliveredId = lastEventId;
    this.pending = [];
    this.controller = new AbortController();
    this.flush = frameScheduler(() => {
      const batch = this.pending;
      this.pending = [];
      if (this.closed) return;
      this.deliveredId = this.lastEventId;
      if (batch.length) this.onStates(batch);
    });
    this.closed = false;
    this.run();
  }

  close() {
    this.closed = true;
    this.controller.abort();
    this.flush.cancel();
  }

  status(state, extra = {}) {
    if (!this.closed) this.onStatus({ state, ...extra });
  }

  async run() {
    const signal = this.controller.signal;
    let backoff = 1000;
    while (!this.closed) {
      this.status(this.lastEventId === null ? "connecting" : "reconnecting");
      let error = null;
      try {
        const extra = { Accept: "text/event-stream" };
        if (this.lastEventId !== null) extra["Last-Event-ID"] = this.lastEventId;
        let response;
        try {
          response = await fetch(url("api/v1/watch", this.query), {
            headers: headers(extra),
            signal,
            cache: "no-store",
          });
        } catch (cause) {
          if (cause.name === "AbortError") return;
          throw networkError(cause);
        }
        if (!response.ok) {
          error = await errorOf(response);
          if (response.status === 401 || response.status === 400) {
            // Retrying cannot help: wait for a new token (the view restarts) or new filters.
            this.status("stopped", { error });
            return;
          }
        } else {
          this.status("live");
          error = await this.read(response.body);
          backoff = 1000;
        }
      } catch (cause) {
        if (cause.name === "AbortError" || this.closed) return;
        error = cause instanceof ApiError ? cause : networkError(cause);
      }
      if (this.closed) return;
      error ??= new ApiError(0, "stream_ended", "the server ended the stream");
      this.status("waiting", { error, retryIn: backoff });
      await sleep(backoff, signal);
      backoff = Math.min(backoff * 2, 10_000);
    }
  }

  /** Read events until the stream ends; return the error event's error, if one came. */
  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let event = "";
    let data = [];
    let idBuffer = this.lastEventId;
    let failure = null;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let start = 0;
        for (;;) {
          const end = buffer.indexOf("\n", start);
          if (end < 0) break;
          const line = buffer.slice(start, end).replace(/\r$/, "");
          start = end + 1;
          if (line === "") {
            // Dispatch (the rules of the HTML standard's event-stream parser).
            this.lastEventId = idBuffer;
            if (data.length) {
              const text = data.join("\n");
              if (event === "state") this.pending.push(JSON.parse(text));
              else if (event === "error") {
                const info = JSON.parse(text);
                failure = new ApiError(503, info.type, info.message);
              }
              this.flush();
            }
            event = "";
            data = [];
            continue;
          }
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let value_ = colon < 0 ? "" : line.slice(colon + 1);
          if (value_.startsWith(" ")) value_ = value_.slice(1);
          if (field === "event") event = value_;
          else if (field === "data") data.push(value_);
          else if (field === "id") idBuffer = value_;
        }
        buffer = buffer.slice(start);
      }
    } finally {
      reader.releaseLock();
    }
    return failure;
  }
}

/**
 * The store's latest revision, followed by long polls of `GET /api/v1/head`: listeners hear
 * each new revision (at most about twice a second, however fast the store moves).
 */
export class HeadFollower {
  constructor() {
    this.rev = null;
    this.listeners = new Set();
    this.controller = null;
  }

  subscribe(listener) {
    this.listeners.add(listener);
    if (this.rev !== null) listener(this.rev, null);
    return () => this.listeners.delete(listener);
  }

  start() {
    this.stop();
    this.controller = new AbortController();
    this.loop(this.controller.signal);
  }

  stop() {
    this.controller?.abort();
    this.controller = null;
  }

  /** A revision seen elsewhere (a watch stream): the store has reached at least that. */
  observe(rev) {
    if (this.rev !== null && rev > this.rev) {
      this.rev = rev;
      this.notify(rev, null);
    }
  }

  notify(rev, error) {
    for (const listener of this.listeners) listener(rev, error);
  }

  async loop(signal) {
    let backoff = 1000;
    while (!signal.aborted) {
      try {
        const query = this.rev === null ? {} : { wait_for: this.rev + 1, timeout: 25 };
        const { rev } = await api("api/v1/head", { query, signal });
        if (rev !== this.rev) {
          this.rev = rev;
          this.notify(rev, null);
        }
        backoff = 1000;
        await sleep(500, signal);
      } catch (error) {
        if (error.name === "AbortError") return;
        this.notify(this.rev, error);
        if (error.status === 401) return;
        await sleep(backoff, signal);
        backoff = Math.min(backoff * 2, 10_000);
      }
    }
  }
}
