// Managed flows: the list (by owner, status, controller and runtime) and one flow with its
// steps, its audit trail and the moves a person may make on it (resume, request-cancel,
// cancel), each confirmed first.

import { api, segment, WatchStream } from "./api.js";
import { badge, clock, fmtCount, fmtTime, h, replace, shorten, valueView } from "./dom.js";
import { streamText } from "./states.js";
import { LiveCollection, VirtualTable } from "./table.js";

export const FLOW_STATUSES = ["created", "running", "waiting", "finished", "failed", "cancelled"];
const TERMINAL = new Set(["finished", "failed", "cancelled"]);
const RUNTIMES = ["managed", "mirrored", "pipeline"];
const SHOWN = 500; // rows of steps or events drawn at most

/**
 * A list that loads every page of a route once, then follows the store: each time its head
 * moves, it asks the same route for what changed since the newest revision it has seen.
 */
export class FollowedList {
  constructor({ ctx, load, onItems, onError }) {
    this.ctx = ctx;
    this.load = load; // async (sinceRev, initial, signal) => {items, more, cursor}
    this.onItems = onItems;
    this.onError = onError;
    this.cursor = 0;
    this.controller = new AbortController();
    this.busy = false;
    this.again = false;
    this.loaded = false;
    this.unsubscribe = null;
  }

  async start() {
    const signal = this.controller.signal;
    try {
      await this.readAll(true, signal);
      if (signal.aborted) return;
      this.loaded = true;
      this.unsubscribe = this.ctx.head.subscribe((rev) => {
        if (rev !== null && rev > this.cursor) this.refresh();
      });
    } catch (error) {
      if (error.name !== "AbortError") this.onError(error);
    }
  }

  async readAll(initial, signal) {
    for (;;) {
      const { items, more, cursor } = await this.load(this.cursor, initial, signal);
      if (signal.aborted) return; // the filters changed meanwhile: these items are not wanted
      this.cursor = Math.max(this.cursor, cursor);
      this.onItems(items, initial);
      if (!more) return;
    }
  }

  async refresh() {
    if (this.busy) {
      this.again = true;
      return;
    }
    this.busy = true;
    try {
      do {
        this.again = false;
        await this.readAll(false, this.controller.signal);
      } while (this.again);
    } catch (error) {
      if (error.name !== "AbortError") this.onError(error);
    } finally {
      this.busy = false;
    }
  }

  stop() {
    this.controller.abort();
    this.unsubscribe?.();
  }
}

/** A filter bar: text inputs applied on Enter or when left, selects at once. */
export function filterBar(label, fields, onChange) {
  const controls = fields.map((field) => {
    const id = `filter-${field.name}`;
    let control;
    if (field.options) {
      control = h("select", { id }, h("option", { value: "" }, "any"),
        field.options.map((o) => h("option", { value: o, selected: o === field.value }, o)));
      control.addEventListener("change", () => onChange(field.name, control.value));
    } else {
      control = h("input", {
        id, type: "text", value: field.value ?? "", placeholder: field.placeholder ?? "",
        autocomplete: "off", spellcheck: "false",
      });
      const apply = () => {
        if (control.value.trim() !== (field.value ?? "")) {
          field.value = control.value.trim();
          onChange(field.name, field.value);
        }
      };
      control.addEventListener("change", apply);
      control.addEventListener("keydown", (event) => {
        if (event.key === "Enter") apply();
      });
    }
    return [h("label", { for: id }, field.title), control];
  });
  return h("div", { class: "filters", role: "search", "aria-label": label }, controls);
}

export function flowLink(id) {
  return `#/flows/${segment(id)}`;
}

/** A list view of items that a FollowedList keeps up to date. */
export class ListView {
  constructor(ctx, { title, path, filters, columns, key, order, link, render, load, matches, empty }) {
    this.ctx = ctx;
    this.title = title;
    this.path = path;
    this.filters = filters;
    this.load = load;
    this.matches = matches;
    this.items = new LiveCollection(key, order);
    this.heldChanges = 0;
    this.table = new VirtualTable({
      label: `${title}, latest change first`,
      columns,
      item: (k) => this.items.get(k),
      link,
      render,
      empty,
    });
    this.table.onHoldChange = (held) => {
      if (!held) this.update();
    };
    this.count = h("span", { class: "count" });
    this.state = h("span", { class: "conn wait" }, "○ loading…");
    this.el = h("section", { class: "view view-fill" },
      h("div", { class: "view-head" }, h("h1", { tabindex: -1 }, title)),
      filterBar(`Filter ${title.toLowerCase()}`, filters, (name, value) => this.filterChanged(name, value)),
      h("div", { class: "status-line" }, this.count, this.state),
      this.table.el);
    this.start();
  }

  values() {
    return Object.fromEntries(this.filters.map((f) => [f.name, f.value ?? ""]));
  }

  filterChanged(name, value) {
    const field = this.filters.find((f) => f.name === name);
    field.value = value;
    const params = new URLSearchParams();
    for (const f of this.filters) if (f.value) params.set(f.name, f.value);
    this.ctx.replaceQuery(this.path, params);
    this.start();
  }

  start() {
    this.follower?.stop();
    this.items.clear();
    const values = this.values();
    this.items.match = (item) => this.matches(item, values);
    this.update();
    this.state.textContent = "○ loading…";
    this.state.className = "conn wait";
    this.follower = new FollowedList({
      ctx: this.ctx,
      load: (since, initial, signal) => this.load(values, since, initial, signal),
      onItems: (items, initial) => {
        this.items.merge(items);
        if (this.table.held && !initial) {
          this.heldChanges += items.length;
          this.table.refresh();
        } else {
          this.update();
        }
        if (this.follower?.loaded || !initial) {
          this.state.textContent = "● live";
          this.state.className = "conn ok";
        }
      },
      onError: (error) => {
        this.state.textContent = `○ ${error}`;
        this.state.className = "conn bad";
        this.ctx.toast(error, this.title);
      },
    });
    this.follower.start().then(() => {
      if (this.follower.loaded) {
        this.state.textContent = "● live";
        this.state.className = "conn ok";
      }
    });
  }

  update() {
    this.heldChanges = 0;
    this.table.setKeys(this.items.view());
    this.count.textContent = `${fmtCount(this.table.keys.length)} ${this.title.toLowerCase()}`;
  }

  destroy() {
    this.follower?.stop();
    this.table.destroy();
  }
}

export class FlowsView extends ListView {
  constructor(ctx, params) {
    super(ctx, {
      title: "Managed flows",
      path: "/flows",
      filters: [
        { name: "owner", title: "Owner", value: params.get("owner") ?? "", placeholder: "exact owner" },
        { name: "status", title: "Status", value: params.get("status") ?? "", options: FLOW_STATUSES },
        { name: "controller", title: "Controller", value: params.get("controller") ?? "", placeholder: "exact controller" },
        { name: "runtime", title: "Runtime", value: params.get("runtime") ?? "", options: RUNTIMES },
      ],
      columns: [
        { title: "Flow", width: "minmax(12rem, 2fr)", className: "mono" },
        { title: "Status", width: "10rem" },
        { title: "Goal", width: "minmax(10rem, 2fr)" },
        { title: "Owner", width: "minmax(7rem, 1fr)", className: "mono" },
        { title: "Step", width: "minmax(7rem, 1fr)", className: "mono" },
        { title: "Runtime", width: "6.5rem" },
        { title: "Updated (UTC)", width: "13.5rem", className: "mono" },
        { title: "Rev", width: "6rem", className: "num" },
      ],
      key: (flow) => flow.id,
      order: (flow) => flow.revision,
      link: (flow) => flowLink(flow.id),
      render: (cells, flow) => {
        cells[0].textContent = flow.id;
        cells[0].title = flow.id;
        replace(cells[1], badge(flow.status), flow.cancel_requested ? h("span", { class: "badge cancel" }, "cancel asked") : null);
        cells[2].textContent = flow.goal;
        cells[2].title = flow.goal;
        cells[3].textContent = flow.owner;
        cells[4].textContent = flow.current_step;
        cells[5].textContent = flow.runtime;
        cells[6].textContent = fmtTime(flow.updated_at);
        cells[7].textContent = fmtCount(flow.revision);
      },
      // The first read filters by status on the server; later reads ask for every flow that
      // changed (one that left the status must be seen leaving) and the page filters them.
      load: async (values, since, initial, signal) => {
        const query = { ...values, since_rev: since, limit: 1000 };
        if (!initial) delete query.status;
        const page = await api("api/v1/flows", { query, signal });
        return { items: page.flows, more: page.more, cursor: page.last_rev };
      },
      matches: (flow, values) => !values.status || flow.status === values.status,
      empty: "No managed flow matches these filters.",
    });
  }
}

/** A plain table of at most SHOWN rows (the newest ones), with fixed columns. */
export function fixedTable(caption, columns, rows, emptyText) {
  const shown = rows.slice(-SHOWN);
  return h("table", { class: "fixed" },
    h("caption", {}, caption, rows.length > SHOWN
      ? h("span", { class: "note" }, ` (the newest ${SHOWN} of ${fmtCount(rows.length)})`) : null),
    h("colgroup", {}, columns.map((c) => h("col", { class: c.className ?? "" }))),
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c.title)))),
    h("tbody", {}, shown.length
      ? shown.map((row) => h("tr", {}, row.map((cell) => h("td", {}, cell))))
      : h("tr", {}, h("td", { colspan: columns.length, class: "note" }, emptyText))));
}

/** "label: value" pairs as a definition list. */
export function fields(pairs) {
  return h("dl", { class: "fields" }, pairs.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

export function stepRows(steps) {
  return steps.map((step) => [
    h("span", { class: "mono", title: step.run_id }, step.run_id),
    h("span", { class: "mono" }, step.task),
    badge(step.status),
    String(step.attempt),
    step.error ? h("span", { class: "error-text" }, valueView(step.error, 80)) : valueView(step.result, 80),
    h("span", { class: "mono" }, clock(step.updated_at)),
  ]);
}

export const STEP_COLUMNS = [
  { title: "Run", className: "c-id" },
  { title: "Task", className: "c-task" },
  { title: "Status", className: "c-status" },
  { title: "Attempt", className: "c-num" },
  { title: "Result or error", className: "c-wide" },
  { title: "Updated", className: "c-time" },
];

/**
 * A detail view that reads its data once and again whenever the state it shows gets a new
 * version (followed over the watch stream).
 */
export class DetailView {
  constructor(ctx, id) {
    this.ctx = ctx;
    this.id = id;
    this.controller = new AbortController();
    this.stream = null;
    this.loading = false;
    this.again = false;
    this.live = h("span", { class: "conn wait" }, "○ loading…");
  }

  async reload() {
    if (this.loading) {
      this.again = true;
      return;
    }
    this.loading = true;
    try {
      do {
        this.again = false;
        const data = await this.fetch(this.controller.signal);
        this.render(data);
        if (!this.stream) this.follow(this.revisionOf(data));
      } while (this.again);
    } catch (error) {
      if (error.name === "AbortError") return;
      this.failed(error);
    } finally {
      this.loading = false;
    }
  }

  follow(since) {
    this.stream = new WatchStream({ id: this.id, since_rev: since }, {
      onStates: () => this.reload(),
      onStatus: (status) => {
        const [text, kind] = streamText(status);
        this.live.textContent = text;
        this.live.className = `conn ${kind}`;
      },
    });
  }

  destroy() {
    this.controller.abort();
    this.stream?.close();
  }
}

export class FlowView extends DetailView {
  constructor(ctx, id) {
    super(ctx, id);
    this.title = `Flow ${shorten(id, 40)}`;
    this.body = h("div", { class: "detail" }, h("p", { class: "loading" }, "Loading…"));
    this.el = h("section", { class: "view view-scroll" },
      h("div", { class: "view-head" },
        h("a", { href: "#/flows", class: "back" }, "← Managed flows"),
        h("h1", { tabindex: -1, class: "mono" }, id),
        this.live),
      this.body);
    this.reload();
  }

  async fetch(signal) {
    const base = `api/v1/flows/${segment(this.id)}`;
    // The flow first: when it does not exist, one request says so.
    const flow = await api(base, { signal });
    const [events, steps] = await Promise.all([
      api(`${base}/events`, { signal }),
      api(`${base}/steps`, { signal }),
    ]);
    return { flow, events, steps };
  }

  revisionOf({ flow }) {
    return flow.revision;
  }

  failed(error) {
    replace(this.body, h("p", { class: "error", role: "alert" }, `Cannot read this flow: ${error}`));
  }

  render({ flow, events, steps }) {
    this.flow = flow;
    const focused = this.body.contains(document.activeElement) ? document.activeElement.dataset.action : null;
    const links = [h("a", { href: `#/states/${segment(flow.id)}` }, "History of its state")];
    if (flow.runtime === "pipeline") links.push(h("a", { href: `#/executions/${segment(flow.id)}` }, "As an execution"));
    replace(this.body,
      h("div", { class: "detail-side" },
        fields([
          ["Status", h("span", {}, badge(flow.status), flow.cancel_requested ? h("span", { class: "badge cancel" }, "cancel asked") : null)],
          ["Goal", flow.goal],
          ["Owner", h("span", { class: "mono" }, flow.owner)],
          ["Controller", h("span", { class: "mono" }, flow.controller)],
          ["Origin", flow.origin],
          ["Runtime", flow.pipeline ? `${flow.runtime} (${flow.pipeline})` : flow.runtime],
          ["Current step", h("span", { class: "mono" }, flow.current_step)],
          ["Waits for", flow.wait ? valueView(flow.wait, 60) : null],
          ["Created", `${fmtTime(flow.created_at)} UTC`],
          ["Updated", `${fmtTime(flow.updated_at)} UTC`],
          ["Revision", fmtCount(flow.revision)],
        ]),
        this.actions(flow),
        h("p", { class: "links" }, links),
        h("h2", {}, "State"),
        h("pre", { class: "json" }, JSON.stringify(flow.state, null, 2))),
      h("div", { class: "detail-main" },
        fixedTable("Steps", STEP_COLUMNS, stepRows(steps), "No step recorded."),
        fixedTable("Audit trail", [
          { title: "Rev", className: "c-num" },
          { title: "At", className: "c-time" },
          { title: "Event", className: "c-task" },
          { title: "Status", className: "c-status" },
          { title: "Payload", className: "c-wide" },
        ], events.map((event) => [
          fmtCount(event.revision),
          h("span", { class: "mono" }, clock(event.at)),
          h("span", { class: "mono" }, event.kind),
          badge(event.status),
          valueView(event.payload, 90),
        ]), "No event.")));
    if (focused) this.body.querySelector(`[data-action="${focused}"]`)?.focus();
  }

  actions(flow) {
    const terminal = TERMINAL.has(flow.status);
    const base = `api/v1/flows/${segment(flow.id)}`;
    const act = (name, path, body) => async () => {
      const updated = await api(`${base}/${path}`, { method: "POST", body: body ? body() : undefined });
      this.ctx.toast(`${flow.id}: ${name} done; the flow is ${updated.status}${updated.cancel_requested ? " (cancel asked)" : ""}`);
      this.reload();
      return updated;
    };
    const patchInput = () => h("div", { class: "field-block" },
      h("label", { for: "resume-patch" }, "Patch to merge into its state (JSON object, optional)"),
      h("input", { id: "resume-patch", type: "text", class: "mono", placeholder: '{"key": "value"}', autocomplete: "off" }));
    const button = (name, label, enabled, why, ask) => h("button", {
      type: "button",
      dataset: { action: name },
      disabled: !enabled,
      title: enabled ? null : why,
      onclick: ask,
    }, label);
    return h("div", { class: "actions-bar", role: "group", "aria-label": "Actions" },
      button("resume", "Resume…", flow.status === "waiting", "only a waiting flow resumes", () => {
        const extra = patchInput();
        this.ctx.confirm({
          title: "Resume this flow?",
          text: `${flow.id} goes from waiting to running; its wait is cleared.`,
          ok: "Resume",
          extra,
          run: act("resume", "resume", () => {
            const text = extra.querySelector("input").value.trim();
            let patch = null;
            if (text) {
              try {
                patch = JSON.parse(text);
              } catch (error) {
                throw new Error(`the patch is not JSON: ${error.message}`);
              }
              if (!patch || typeof patch !== "object" || Array.isArray(patch)) throw new Error("the patch must be a JSON object");
            }
            return { patch };
          }),
        });
      }),
      button("request-cancel", "Request cancel…", !terminal && !flow.cancel_requested,
        terminal ? "the flow has ended" : "a cancel was already asked for", () => this.ctx.confirm({
          title: "Ask this flow to cancel?",
          text: `${flow.id} is marked for cancellation; whoever runs it stops at its next step. Its status does not change now.`,
          ok: "Request cancel",
          run: act("request-cancel", "request-cancel"),
        })),
      button("cancel", "Cancel…", !terminal, "the flow has ended", () => this.ctx.confirm({
        title: "Cancel this flow?",
        text: `${flow.id} becomes cancelled at once. This cannot be undone.`,
        ok: "Cancel the flow",
        run: act("cancel", "cancel"),
      })),
      terminal ? h("span", { class: "note" }, `${flow.status}: nothing changes it any more`) : null);
  }
}
