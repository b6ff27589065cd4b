// One state's history: a timeline of its versions, oldest first, fifty to a page, each showing
// what it changed against the version before it (the transition, labels, annotations and
// transition annotations). It opens on the newest page and follows new versions live.

import { api, segment, WatchStream } from "./api.js";
import { badge, fmtCount, fmtTime, h, replace, shorten, valueView } from "./dom.js";
import { delayOf, statusOf, streamText } from "./states.js";

const PAGE = 50;
const SCAN = 1000;

/** The differences between two string maps, by key: added, removed, changed. */
export function diffMaps(before, after) {
  const changes = [];
  const keys = new Set([...Object.keys(before ?? {}), ...Object.keys(after ?? {})]);
  for (const key of [...keys].sort()) {
    const had = before && Object.hasOwn(before, key);
    const has = after && Object.hasOwn(after, key);
    if (had && !has) changes.push({ key, kind: "removed", old: before[key] });
    else if (!had && has) changes.push({ key, kind: "added", value: after[key] });
    else if (before[key] !== after[key]) changes.push({ key, kind: "changed", old: before[key], value: after[key] });
  }
  return changes;
}

/** For two JSON object texts: the top-level keys whose values differ; else null. */
function jsonKeysChanged(oldText, newText) {
  let a;
  let b;
  try {
    a = JSON.parse(oldText);
    b = JSON.parse(newText);
  } catch {
    return null;
  }
  if (!a || !b || typeof a !== "object" || typeof b !== "object" || Array.isArray(a) || Array.isArray(b)) return null;
  const keys = new Set([...Object.keys(a), ...Object.keys(b)]);
  return [...keys].filter((k) => JSON.stringify(a[k]) !== JSON.stringify(b[k])).sort();
}

function changeList(changes) {
  return h("ul", { class: "changes" }, changes.map((change) => {
    if (change.kind === "added") {
      return h("li", { class: "added" }, h("span", { class: "sign", "aria-label": "added" }, "+"),
        h("span", { class: "key" }, change.key), " = ", valueView(change.value));
    }
    if (change.kind === "removed") {
      return h("li", { class: "removed" }, h("span", { class: "sign", "aria-label": "removed" }, "−"),
        h("span", { class: "key" }, change.key), h("span", { class: "was" }, " was "), valueView(change.old, 60));
    }
    const keys = jsonKeysChanged(change.old, change.value);
    return h("li", { class: "changed" }, h("span", { class: "sign", "aria-label": "changed" }, "~"),
      h("span", { class: "key" }, change.key),
      keys ? h("span", { class: "was" }, ` (${keys.length ? keys.join(", ") : "reordered"})`) : null,
      ": ", valueView(change.old, 50), h("span", { class: "arrow" }, " → "), valueView(change.value, 70));
  }));
}

/** What a version changed, against the one before it (null: it is the first). */
export function versionCard(version, previous, number) {
  const status = statusOf(version);
  const delay = delayOf(version);
  const rows = [];
  const to = version.transition?.to ?? "";
  let transition;
  if (previous === null) transition = to ? `→ ${to}` : "no flow (ended)";
  else {
    const from = previous.transition?.to ?? "";
    transition = from === to ? `stays at ${to || "no flow (ended)"}` : `${from || "no flow"} → ${to || "no flow (ended)"}`;
  }
  rows.push(["Transition", h("span", { class: "mono" }, transition,
    delay ? h("span", { class: "note" }, ` delayed: → ${delay.to} at ${fmtTime(delay.at)}`) : null)]);
  const sections = [
    ["Labels", previous?.labels, version.labels],
    ["Annotations", previous?.annotations, version.annotations],
    ["Transition annotations", previous?.transition?.annotations, version.transition?.annotations],
  ];
  let changed = false;
  for (const [title, before, after] of sections) {
    const changes = diffMaps(before ?? {}, after ?? {});
    if (changes.length) {
      changed = true;
      rows.push([title, changeList(changes)]);
    }
  }
  if (previous !== null && !changed && (previous.transition?.to ?? "") === to) {
    rows.push(["", h("span", { class: "note" }, "No label or annotation changed.")]);
  }
  return h("li", { class: "version", dataset: { rev: String(version.rev) } },
    h("div", { class: "version-head" },
      h("span", { class: "vnum" }, `#${fmtCount(number)}`),
      h("span", { class: "rev" }, `rev ${fmtCount(version.rev)}`),
      badge(status),
      previous === null ? h("span", { class: "badge created" }, "created") : null,
      h("time", { datetime: version.committed_at ?? "" }, fmtTime(version.committed_at), " UTC")),
    h("dl", { class: "version-body" }, rows.map(([title, body]) => [h("dt", {}, title), h("dd", {}, body)])));
}

export class HistoryView {
  constructor(ctx, id) {
    this.ctx = ctx;
    this.id = id;
    this.title = `History of ${shorten(id, 40)}`;
    this.revs = []; // every version's revision, oldest first
    this.latest = null;
    this.page = -1;
    this.shown = []; // the versions on the page shown
    this.controller = new AbortController();
    this.stream = null;
    this.streamStatus = { state: "connecting" };

    this.summary = h("div", { class: "summary" });
    this.pager = h("nav", { class: "pager", "aria-label": "History pages" });
    this.live = h("div", { class: "status-line", role: "status" });
    this.timeline = h("ol", { class: "timeline", "aria-label": "Versions, oldest first" });
    this.scroller = h("div", { class: "scroll-area", tabindex: 0, "aria-label": "Versions" }, this.timeline);
    this.el = h("section", { class: "view view-fill" },
      h("div", { class: "view-head" },
        h("a", { href: "#/states", class: "back" }, "← States"),
        h("h1", { tabindex: -1, class: "mono" }, id)),
      this.summary,
      h("div", { class: "toolbar" }, this.pager, this.live),
      this.scroller);
    this.buildPager();
    this.load();
  }

  path() {
    return `api/v1/states/${segment(this.id)}/history`;
  }

  async load() {
    const signal = this.controller.signal;
    replace(this.timeline, h("li", { class: "loading" }, "Loading the history…"));
    try {
      // Read the revisions of the whole history once (a page of 1,000 at a time), keeping
      // the versions of the newest page: the pages are then known, and the newest shows.
      let since = 0;
      let tail = [];
      for (;;) {
        const page = await api(this.path(), { query: { since_rev: since, limit: SCAN }, signal });
        for (const version of page.states) this.revs.push(version.rev);
        tail = tail.concat(page.states).slice(-(PAGE + 1));
        if (page.states.length) since = page.states[page.states.length - 1].rev;
        if (!page.more) break;
      }
      if (!this.revs.length) {
        // No version: let the state route say why (not found).
        await api(`api/v1/states/${segment(this.id)}`, { signal });
        return;
      }
      this.latest = tail[tail.length - 1];
      const last = this.pageCount() - 1;
      const onPage = this.revs.length - last * PAGE;
      const versions = tail.slice(-onPage);
      const previous = tail.length > onPage ? tail[tail.length - onPage - 1] : null;
      this.show(last, previous, versions);
      this.scroller.scrollTop = this.scroller.scrollHeight;
      this.follow(since);
    } catch (error) {
      if (error.name === "AbortError") return;
      replace(this.timeline, h("li", { class: "error" }, `Cannot read this history: ${error}`));
      this.updateSummary();
    }
  }

  pageCount() {
    return Math.max(1, Math.ceil(this.revs.length / PAGE));
  }

  async goTo(page) {
    const signal = this.controller.signal;
    const first = page * PAGE;
    const since = first === 0 ? 0 : this.revs[first - 1];
    try {
      const [versions, previous] = await Promise.all([
        api(this.path(), { query: { since_rev: since, limit: PAGE }, signal }),
        first === 0 ? null : api(`api/v1/states/${segment(this.id)}`, { query: { rev: since }, signal }),
      ]);
      this.show(page, previous, versions.states);
      this.scroller.scrollTop = 0;
    } catch (error) {
      if (error.name === "AbortError") return;
      this.ctx.toast(error, "history page");
    }
  }

  show(page, previous, versions) {
    this.page = page;
    this.shown = versions.slice(0, PAGE);
    this.previous = previous;
    const first = page * PAGE;
    const cards = [];
    let before = previous;
    this.shown.forEach((version, i) => {
      cards.push(versionCard(version, before, first + i + 1));
      before = version;
    });
    replace(this.timeline, cards);
    this.updatePager();
    this.updateSummary();
  }

  follow(since) {
    this.stream = new WatchStream({ id: this.id, since_rev: since, limit: SCAN }, {
      onStates: (batch) => this.onStates(batch),
      onStatus: (status) => {
        this.streamStatus = status;
        this.updateLive();
      },
    });
  }

  onStates(batch) {
    const last = this.revs[this.revs.length - 1] ?? 0;
    const fresh = batch.filter((v) => v.rev > last);
    if (!fresh.length) return;
    const onLastPage = this.page === this.pageCount() - 1;
    const atBottom = this.scroller.scrollTop + this.scroller.clientHeight >= this.scroller.scrollHeight - 8;
    for (const version of fresh) {
      this.revs.push(version.rev);
      if (onLastPage && this.shown.length < PAGE) {
        const before = this.shown[this.shown.length - 1] ?? this.previous;
        this.shown.push(version);
        this.timeline.append(versionCard(version, before, this.revs.length));
      }
    }
    this.latest = fresh[fresh.length - 1];
    this.ctx.head.observe(this.latest.rev);
    // Follow the newest version when the reader was at the end; otherwise stay put.
    if (onLastPage && atBottom) this.scroller.scrollTop = this.scroller.scrollHeight;
    this.updatePager();
    this.updateSummary();
  }

  buildPager() {
    const button = (text, label, go) => h("button", { type: "button", "aria-label": label, onclick: go }, text);
    this.firstButton = button("« First", "First page", () => this.goTo(0));
    this.olderButton = button("‹ Older", "Older versions", () => this.goTo(this.page - 1));
    this.pageText = h("span", { class: "page-text" });
    this.newerButton = button("Newer ›", "Newer versions", () => this.goTo(this.page + 1));
    this.latestButton = button("Latest »", "Latest page", () => this.goTo(this.pageCount() - 1));
    replace(this.pager, this.firstButton, this.olderButton, this.pageText, this.newerButton, this.latestButton);
    this.updatePager();
  }

  updatePager() {
    const count = this.revs.length;
    const pages = this.pageCount();
    const first = this.page * PAGE + 1;
    const last = this.page * PAGE + this.shown.length;
    const range = first === last ? `version ${fmtCount(first)}` : `versions ${fmtCount(first)}–${fmtCount(last)}`;
    this.pageText.textContent = count
      ? `${range} of ${fmtCount(count)} · page ${this.page + 1} of ${pages}`
      : "no version yet";
    this.firstButton.disabled = this.olderButton.disabled = this.page <= 0;
    this.newerButton.disabled = this.latestButton.disabled = this.page >= pages - 1 || this.page < 0;
  }

  updateLive() {
    const [text, kind] = streamText(this.streamStatus);
    this.live.textContent = text;
    this.live.className = `status-line conn ${kind}`;
  }

  updateSummary() {
    const state = this.latest;
    if (!state) {
      replace(this.summary);
      return;
    }
    const labels = Object.entries(state.labels ?? {});
    const links = [];
    if (state.labels?.["flow.runtime"] !== undefined) {
      links.push(h("a", { href: `#/flows/${segment(state.id)}` }, "Open as a managed flow"));
      if (state.labels["flow.runtime"] === "pipeline") {
        links.push(h("a", { href: `#/executions/${segment(state.id)}` }, "Open as an execution"));
      }
    }
    replace(this.summary,
      h("span", { class: "field" }, "now ", badge(statusOf(state))),
      h("span", { class: "field" }, `rev ${fmtCount(state.rev)}`),
      h("span", { class: "field" }, "next flow ", h("span", { class: "mono" }, state.transition?.to || "—")),
      h("span", { class: "field" }, `committed ${fmtTime(state.committed_at)} UTC`),
      h("span", { class: "chips" }, labels.map(([k, v]) => h("a", {
        class: "chip mono",
        href: `#/states?${new URLSearchParams({ label: `${k}=${v}` })}`,
        title: "List the states with this label",
      }, `${k}=${v}`))),
      links);
  }

  destroy() {
    this.controller.abort();
    this.stream?.close();
  }
}
