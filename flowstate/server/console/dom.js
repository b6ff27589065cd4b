// Small DOM and formatting helpers. Text always goes in as text nodes (never as HTML), so a
// state's ids, labels and annotations cannot become markup.

/** Create an element: h("a", {href: "#/x", class: "link"}, "text", child, ...). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

/** Append children (nodes, strings, numbers, nested arrays; null and false are skipped). */
export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Replace every child of `el`. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** "2026-01-02 12:00:01.234" (UTC) for an ISO 8601 time; "" for none. */
export function fmtTime(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  return date.toISOString().replace("T", " ").slice(0, 23);
}

/** "23:49:55.690" (UTC) for an ISO 8601 time, with the whole of it as a tooltip. */
export function clock(iso) {
  return h("time", { datetime: iso ?? "", title: fmtTime(iso) ? `${fmtTime(iso)} UTC` : null }, fmtTime(iso).slice(11));
}

/** A duration between two ISO times, as "1.25 s" or "3 min 4 s"; "" when one is missing. */
export function fmtDuration(fromIso, toIso) {
  if (!fromIso || !toIso) return "";
  const ms = new Date(toIso).getTime() - new Date(fromIso).getTime();
  if (!Number.isFinite(ms)) return "";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(2)} s`;
  const minutes = Math.floor(ms / 60_000);
  return `${minutes} min ${Math.round((ms % 60_000) / 1000)} s`;
}

const numbers = new Intl.NumberFormat("en-US");

/** 12,345 */
export function fmtCount(n) {
  return numbers.format(n);
}

/** JSON on one line, for table cells and summaries. */
export function compactJson(value) {
  if (value === undefined) return "";
  return typeof value === "string" ? value : JSON.stringify(value);
}

/** A value shortened to `max` characters on one line. */
export function shorten(text, max = 120) {
  const line = String(text).replace(/\s+/g, " ");
  return line.length > max ? `${line.slice(0, max - 1)}…` : line;
}

/** A long or structured value: one shortened line that opens onto the whole of it. */
export function valueView(value, max = 120) {
  const text = compactJson(value);
  let pretty = text;
  if (typeof value === "string") {
    try {
      const parsed = JSON.parse(value);
      if (parsed !== null && typeof parsed === "object") pretty = JSON.stringify(parsed, null, 2);
    } catch {
      // Not JSON: shown as it is.
    }
  } else if (value !== null && typeof value === "object") {
    pretty = JSON.stringify(value, null, 2);
  }
  if (value === null || value === undefined) return h("span", { class: "note" }, "—");
  if (text === "") return h("span", { class: "value note", title: "an empty string" }, "\u201c\u201d");
  if (text.length <= max && !text.includes("\n")) {
    return h("span", { class: "value" }, text);
  }
  return h(
    "details",
    { class: "value" },
    h("summary", {}, shorten(text, max)),
    h("pre", {}, pretty),
  );
}

/** A status as a coloured badge (the colour comes from the class `status-<name>`). */
export function badge(status, extra = "") {
  return h("span", { class: `badge status-${status} ${extra}`.trim() }, status);
}

/** Run `fn` at most once per animation frame (and at least once a second while hidden). */
export function frameScheduler(fn) {
  let scheduled = false;
  let frame = 0;
  let timer = 0;
  const run = () => {
    if (!scheduled) return;
    scheduled = false;
    cancelAnimationFrame(frame);
    clearTimeout(timer);
    fn();
  };
  const schedule = () => {
    if (scheduled) return;
    scheduled = true;
    frame = requestAnimationFrame(run);
    // Animation frames stop in a hidden tab; the timer keeps batches from piling up there.
    timer = setTimeout(run, 1000);
  };
  schedule.cancel = () => {
    scheduled = false;
    cancelAnimationFrame(frame);
    clearTimeout(timer);
  };
  return schedule;
}
