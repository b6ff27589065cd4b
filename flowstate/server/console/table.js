// A virtual table: thousands of rows, a few dozen in the page at a time.
//
// Rows have one fixed height and sit at fixed positions in a body as tall as all of them, so the
// page never reflows when rows arrive or change: only the rows in view (plus a margin) exist as
// elements, and they are reused as the view scrolls. Columns are a fixed grid shared by the
// header and every row, so a long value never widens a column.
//
// Keyboard: Tab reaches one row of the table (the current one); the arrow keys, Page Up/Down,
// Home and End move between rows; Enter opens the row's link.

import { h } from "./dom.js";

const OVERSCAN = 8;

export class VirtualTable {
  /**
   * @param {object} options
   * @param {string} options.label - What the table lists (for screen readers).
   * @param {{title: string, width: string, className?: string}[]} options.columns
   * @param {(key: string) => object} options.item - The item shown for a key.
   * @param {(cells: HTMLElement[], item: object, key: string) => void} options.render -
   *     Fill a row's cells; the first cell holds the row's link (see `link`).
   * @param {(item: object, key: string) => string} options.link - The row's link (a hash).
   * @param {number} [options.rowHeight]
   * @param {string} [options.empty] - What to say when there is no row.
   */
  constructor({ label, columns, item, render, link, rowHeight = 30, empty = "Nothing to show." }) {
    this.columns = columns;
    this.item = item;
    this.renderRow = render;
    this.link = link;
    this.rowHeight = rowHeight;
    this.keys = [];
    this.rows = [];
    this.current = 0; // the row that Tab reaches
    this.pointerInside = false;
    this.focusInside = false;
    this.onHoldChange = () => {};

    const template = columns.map((c) => c.width).join(" ");
    this.head = h(
      "div",
      { class: "vt-head", role: "row" },
      // Headings keep the page's font; a number column's heading aligns with its numbers.
      columns.map((c) => h("div", {
        class: `vt-cell${c.className?.includes("num") ? " num" : ""}`,
        role: "columnheader",
      }, c.title)),
    );
    this.body = h("div", { class: "vt-body", role: "rowgroup" });
    this.emptyNote = h("div", { class: "vt-empty", hidden: true }, empty);
    this.scroller = h(
      "div",
      { class: "vt-scroll", role: "table", "aria-label": label, "aria-rowcount": 1 },
      h("div", { class: "vt-headgroup", role: "rowgroup" }, this.head),
      this.body,
      this.emptyNote,
    );
    this.scroller.style.setProperty("--vt-columns", template);
    this.scroller.style.setProperty("--vt-row", `${rowHeight}px`);
    this.el = h("div", { class: "vt" }, this.scroller);

    this.schedule = () => {
      if (this.frame) return;
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.render();
      });
    };
    this.scroller.addEventListener("scroll", () => {
      this.schedule();
      this.holdChanged();
    }, { passive: true });
    this.scroller.addEventListener("pointerenter", () => {
      this.pointerInside = true;
      this.holdChanged();
    });
    this.scroller.addEventListener("pointerleave", () => {
      this.pointerInside = false;
      this.holdChanged();
    });
    this.scroller.addEventListener("focusin", () => {
      this.focusInside = true;
      this.holdChanged();
    });
    this.scroller.addEventListener("focusout", (event) => {
      this.focusInside = this.scroller.contains(event.relatedTarget);
      this.holdChanged();
    });
    this.scroller.addEventListener("keydown", (event) => this.onKey(event));
    this.resizeObserver = new ResizeObserver(() => this.schedule());
    this.resizeObserver.observe(this.scroller);
    this.wasHeld = false;
  }

  /**
   * True while someone is looking at the rows: the pointer or the focus is in the table, or
   * it is scrolled down. Lists keep their order then (rows change in place), so that nothing
   * moves under the reader's eyes or pointer.
   */
  get held() {
    return this.pointerInside || this.focusInside || this.scroller.scrollTop > 0;
  }

  holdChanged() {
    const held = this.held;
    if (held !== this.wasHeld) {
      this.wasHeld = held;
      this.onHoldChange(held);
    }
  }

  /** Show these keys, in this order. */
  setKeys(keys) {
    const currentKey = this.keys[this.current];
    this.keys = keys;
    const again = currentKey === undefined ? -1 : keys.indexOf(currentKey);
    this.current = again >= 0 ? again : Math.min(this.current, Math.max(0, keys.length - 1));
    this.body.style.height = `${keys.length * this.rowHeight}px`;
    this.scroller.setAttribute("aria-rowcount", String(keys.length + 1));
    this.emptyNote.hidden = keys.length > 0;
    this.render();
  }

  /** Redraw the rows in view whose item changed. */
  refresh() {
    this.schedule();
  }

  scrollToTop() {
    this.scroller.scrollTop = 0;
    this.render();
  }

  render() {
    const { rowHeight, keys } = this;
    const top = this.scroller.scrollTop;
    const height = this.scroller.clientHeight || 600;
    const start = Math.max(0, Math.floor(top / rowHeight) - OVERSCAN);
    const end = Math.min(keys.length, Math.ceil((top + height) / rowHeight) + OVERSCAN);
    const count = Math.max(0, end - start);
    while (this.rows.length < count) this.rows.push(this.makeRow());
    const focused = this.rows.find((row) => row.el.contains(document.activeElement));
    for (let i = 0; i < this.rows.length; i++) {
      const row = this.rows[i];
      if (i >= count) {
        if (!row.el.hidden) {
          row.el.hidden = true;
          row.key = undefined;
          row.item = undefined;
        }
        continue;
      }
      const index = start + i;
      const key = keys[index];
      const item = this.item(key);
      row.el.hidden = false;
      if (row.index !== index) {
        row.index = index;
        row.el.style.transform = `translateY(${index * rowHeight}px)`;
        row.el.setAttribute("aria-rowindex", String(index + 2));
      }
      row.anchor.tabIndex = index === this.current ? 0 : -1;
      if (row.key !== key || row.item !== item) {
        row.key = key;
        row.item = item;
        row.el.dataset.key = key;
        row.anchor.href = this.link(item, key);
        this.renderRow(row.cells, item, key);
      }
    }
    // Keep the focus on the row it was on, wherever that row is drawn now.
    if (focused && !focused.el.contains(document.activeElement)) this.focusRow(this.current);
  }

  makeRow() {
    const cells = this.columns.map((c) => h("div", { class: `vt-cell ${c.className ?? ""}`, role: "cell" }));
    const anchor = h("a", { class: "vt-link", tabindex: -1 });
    cells[0].append(anchor);
    const el = h("div", { class: "vt-row", role: "row", hidden: true }, cells);
    // The first cell's text is the link's own text: the renderer fills `cells[0]` through it.
    const row = { el, cells: [anchor, ...cells.slice(1)], anchor, index: -1, key: undefined, item: undefined };
    anchor.addEventListener("focus", () => {
      if (row.index >= 0) this.current = row.index;
    });
    this.body.append(el);
    return row;
  }

  focusRow(index) {
    if (!this.keys.length) return;
    const target = Math.max(0, Math.min(this.keys.length - 1, index));
    this.current = target;
    const top = target * this.rowHeight;
    const view = this.scroller;
    const headHeight = this.head.offsetHeight;
    if (top < view.scrollTop) view.scrollTop = top;
    else if (top + this.rowHeight > view.scrollTop + view.clientHeight - headHeight) {
      view.scrollTop = top + this.rowHeight - view.clientHeight + headHeight;
    }
    this.render();
    const row = this.rows.find((r) => r.index === target && !r.el.hidden);
    row?.anchor.focus({ preventScroll: true });
  }

  onKey(event) {
    if (!(event.target instanceof HTMLElement) || !event.target.classList.contains("vt-link")) return;
    const page = Math.max(1, Math.floor(this.scroller.clientHeight / this.rowHeight) - 1);
    const moves = {
      ArrowDown: this.current + 1,
      ArrowUp: this.current - 1,
      PageDown: this.current + page,
      PageUp: this.current - page,
      Home: 0,
      End: this.keys.length - 1,
    };
    if (!(event.key in moves)) return;
    event.preventDefault();
    this.focusRow(moves[event.key]);
  }

  destroy() {
    cancelAnimationFrame(this.frame);
    this.resizeObserver.disconnect();
  }
}

/**
 * Items by key, kept in "latest change first" order as batches of new versions arrive, with
 * an optional filter. A batch costs one pass over the items, not a sort, so that 10,000 items
 * and 50 changes a second stay cheap.
 */
export class LiveCollection {
  /**
   * @param {(item) => string} key
   * @param {(item) => number} order - Larger is newer (a revision).
   */
  constructor(key, order) {
    this.keyOf = key;
    this.orderOf = order;
    this.items = new Map();
    this.newestFirst = []; // keys
    this.match = () => true;
  }

  get size() {
    return this.items.size;
  }

  get(key) {
    return this.items.get(key);
  }

  clear() {
    this.items.clear();
    this.newestFirst = [];
  }

  /**
   * Take in changed items (each newer than what is held for its key, or new); return how
   * many keys were new.
   */
  merge(batch) {
    const moved = new Map();
    let added = 0;
    for (const item of batch) {
      const key = this.keyOf(item);
      const held = this.items.get(key);
      if (held && this.orderOf(held) > this.orderOf(item)) continue; // an older version
      if (!held && !moved.has(key)) added++;
      this.items.set(key, item);
      moved.set(key, item);
    }
    if (!moved.size) return 0;
    const fresh = [...moved.values()].sort((a, b) => this.orderOf(b) - this.orderOf(a)).map(this.keyOf);
    const rest = this.newestFirst.filter((key) => !moved.has(key));
    // The batch is usually newer than everything held; when it is not, sort all once.
    const oldestFresh = this.orderOf(moved.get(fresh[fresh.length - 1]));
    const newestRest = rest.length ? this.orderOf(this.items.get(rest[0])) : -Infinity;
    this.newestFirst = fresh.concat(rest);
    if (newestRest > oldestFresh) {
      this.newestFirst.sort((a, b) => this.orderOf(this.items.get(b)) - this.orderOf(this.items.get(a)));
    }
    return added;
  }

  /** The keys that pass the filter, newest first. */
  view() {
    const { match, items } = this;
    return this.newestFirst.filter((key) => match(items.get(key)));
  }
}
