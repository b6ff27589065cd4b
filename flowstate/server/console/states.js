// The states view: every state's latest version, live over the watch stream, newest change
// first, filtered by labels (on the server) and by status and id (in the page).

import { segment, WatchStream } from "./api.js";
import { badge, fmtCount, fmtTime, h, replace } from "./dom.js";
import { LiveCollection, VirtualTable } from "./table.js";

/** The status of a version, derived from its transition as flowstate derives it. */
export function statusOf(state) {
  const transition = state.transition ?? {};
  if (!transition.to) return "ended";
  if ("flowstate.paused" in (transition.annotations ?? {})) return "paused";
  return "running";
}

/** The pending delay a version was committed with: {at, to}, or null. */
export function delayOf(state) {
  const annotations = state.transition?.annotations ?? {};
  const at = annotations["flowstate.delay.at"];
  return at === undefined ? null : { at, to: annotations["flowstate.delay.to"] ?? "" };
}

export function labelsText(labels) {
  return Object.entries(labels ?? {}).map(([k, v]) => `${k}=${v}`).join("  ");
}

export function stateLink(id) {
  return `#/states/${segment(id)}`;
}

const STATUSES = ["running", "paused", "ended", "delayed"];

// The states of the list last left, and where its stream was: coming back to the list (from a
// history, say) resumes the stream from there instead of reading every state again.
let kept = null;

/** Drop the kept states (when the token goes). */
export function forgetStates() {
  kept = null;
}

/** The stream's state, in words, for the status line. */
export function streamText(status) {
  switch (status.state) {
    case "live":
      return ["● live", "ok"];
    case "connecting":
      return ["○ connecting…", "wait"];
    case "reconnecting":
      return ["○ reconnecting…", "wait"];
    case "waiting":
      return [`○ ${status.error} — retrying in ${Math.round(status.retryIn / 1000)} s`, "bad"];
    default:
      return [`○ stopped: ${status.error}`, "bad"];
  }
}

export class StatesView {
  constructor(ctx, params) {
    this.ctx = ctx;
    this.title = "States";
    this.labels = params.getAll("label").filter((pair) => pair.includes("="));
    this.status = STATUSES.includes(params.get("status")) ? params.get("status") : "";
    this.search = params.get("q") ?? "";
    this.states = new LiveCollection((s) => s.id, (s) => s.rev);
    this.resumeFrom = null;
    if (kept && kept.labels === JSON.stringify(this.labels)) {
      this.states = kept.states;
      this.resumeFrom = kept.lastEventId;
    }
    kept = null;
    this.heldChanges = 0;
    this.stream = null;
    this.streamStatus = { state: "connecting" };

    this.table = new VirtualTable({
      label: "States, latest change first",
      columns: [
        { title: "State", width: "minmax(12rem, 2fr)", className: "mono" },
        { title: "Status", width: "7rem" },
        { title: "Next flow", width: "minmax(8rem, 1.2fr)", className: "mono" },
        { title: "Rev", width: "6rem", className: "num" },
        { title: "Committed (UTC)", width: "13.5rem", className: "mono" },
        { title: "Labels", width: "minmax(10rem, 2.5fr)", className: "mono" },
      ],
      item: (key) => this.states.get(key),
      link: (state) => stateLink(state.id),
      render: (cells, state) => this.renderRow(cells, state),
      empty: "No state matches these filters.",
    });
    this.table.onHoldChange = (held) => {
      if (!held) this.update();
      else this.showStatus();
    };

    this.el = h("section", { class: "view view-fill" },
      h("div", { class: "view-head" }, h("h1", { tabindex: -1 }, "States")),
      this.filtersBar(),
      // Not a live region: it changes with every batch of versions.
      this.statusLine = h("div", { class: "status-line" }),
      this.table.el,
    );
    this.start();
  }

  filtersBar() {
    this.chips = h("span", { class: "chips" });
    const labelInput = h("input", {
      id: "label-filter",
      type: "text",
      placeholder: "key=value, Enter",
      autocomplete: "off",
      spellcheck: "false",
      "aria-describedby": "label-filter-help",
    });
    labelInput.addEventListener("keydown", (event) => {
      if (event.key !== "Enter") return;
      event.preventDefault();
      const pair = labelInput.value.trim();
      const at = pair.indexOf("=");
      if (at <= 0) {
        this.ctx.toast("A label filter is key=value");
        return;
      }
      if (!this.labels.includes(pair)) this.labels.push(pair);
      labelInput.value = "";
      this.filtersChanged(true);
    });
    const status = h("select", { id: "status-filter" },
      h("option", { value: "" }, "any"),
      STATUSES.map((s) => h("option", { value: s, selected: s === this.status }, s)));
    status.addEventListener("change", () => {
      this.status = status.value;
      this.filtersChanged(false);
    });
    const search = h("input", {
      id: "id-filter", type: "search", value: this.search, placeholder: "part of an id",
      autocomplete: "off", spellcheck: "false",
    });
    search.addEventListener("input", () => {
      this.search = search.value;
      this.filtersChanged(false);
    });
    this.renderChips();
    return h("div", { class: "filters", role: "search", "aria-label": "Filter states" },
      h("label", { for: "label-filter" }, "Labels"),
      this.chips,
      labelInput,
      h("span", { id: "label-filter-help", class: "sr-only" },
        "Type a label as key=value and press Enter; states must have every label listed."),
      h("label", { for: "status-filter" }, "Status"),
      status,
      h("label", { for: "id-filter" }, "Id"),
      search,
    );
  }

  renderChips() {
    replace(this.chips, this.labels.map((pair) => h("span", { class: "chip" },
      h("span", { class: "mono" }, pair),
      h("button", {
        type: "button",
        class: "quiet",
        "aria-label": `Remove the label filter ${pair}`,
        onclick: () => {
          this.labels = this.labels.filter((p) => p !== pair);
          this.filtersChanged(true);
          document.getElementById("label-filter")?.focus();
        },
      }, "×"))));
  }

  filtersChanged(labelsChanged) {
    const params = new URLSearchParams();
    for (const pair of this.labels) params.append("label", pair);
    if (this.status) params.set("status", this.status);
    if (this.search) params.set("q", this.search);
    this.ctx.replaceQuery("/states", params);
    if (labelsChanged) {
      this.renderChips();
      this.start();
    } else {
      this.update();
    }
  }

  start() {
    this.stream?.close();
    const lastEventId = this.resumeFrom;
    this.resumeFrom = null;
    if (lastEventId === null) this.states.clear();
    this.heldChanges = 0;
    this.update();
    this.stream = new WatchStream(
      { label: this.labels, latest_only: true, limit: 1000 },
      {
        lastEventId,
        onStates: (batch) => this.onStates(batch),
        onStatus: (status) => {
          this.streamStatus = status;
          this.showStatus();
        },
      },
    );
  }

  onStates(batch) {
    this.ctx.head.observe(batch[batch.length - 1].rev);
    this.states.merge(batch);
    if (this.table.held) {
      this.heldChanges += batch.length;
      this.table.refresh();
      this.showStatus();
    } else {
      this.update();
    }
  }

  matcher() {
    const { status, search } = this;
    const needle = search.trim().toLowerCase();
    if (!status && !needle) return () => true;
    return (state) => {
      if (needle && !state.id.toLowerCase().includes(needle)) return false;
      if (!status) return true;
      if (status === "delayed") return delayOf(state) !== null;
      return statusOf(state) === status;
    };
  }

  /** Put the rows in order again (also when the reader is looking: they asked for it). */
  update() {
    this.states.match = this.matcher();
    this.heldChanges = 0;
    this.table.setKeys(this.states.view());
    this.showStatus();
  }

  showStatus() {
    if (!this.statusParts) {
      // Made once and updated in place: a button that is replaced on each batch would lose
      // its focus and its clicks.
      this.statusParts = {
        count: h("span", { class: "count" }),
        conn: h("span", { class: "conn" }),
        held: h("span", { class: "held" }),
        newest: h("button", {
          type: "button",
          class: "link-button",
          onclick: () => {
            this.table.scrollToTop();
            this.update();
          },
        }, "Show newest first"),
      };
      const { count, conn, held, newest } = this.statusParts;
      replace(this.statusLine, count, conn, held, newest);
    }
    const { count, conn, held, newest } = this.statusParts;
    const [text, kind] = streamText(this.streamStatus);
    count.textContent = `${fmtCount(this.table.keys.length)} of ${fmtCount(this.states.size)} states`;
    conn.textContent = text;
    conn.className = `conn ${kind}`;
    const changes = this.heldChanges === 1 ? "1 change waits" : `${fmtCount(this.heldChanges)} changes wait`;
    held.textContent = this.heldChanges ? `order held while you look: ${changes}` : "";
    newest.hidden = !this.heldChanges;
  }

  renderRow(cells, state) {
    const status = statusOf(state);
    const delay = delayOf(state);
    cells[0].textContent = state.id;
    cells[0].title = state.id;
    replace(cells[1], badge(status), delay ? h("span", { class: "badge delayed" }, "delayed") : null);
    cells[2].textContent = delay ? `${state.transition.to || "—"} → ${delay.to} at ${fmtTime(delay.at)}` : state.transition?.to || "—";
    cells[3].textContent = fmtCount(state.rev);
    cells[4].textContent = fmtTime(state.committed_at);
    const labels = labelsText(state.labels);
    cells[5].textContent = labels;
    cells[5].title = labels;
  }

  destroy() {
    // Kept with the id of the last version the list took in, not of the last one read:
    // versions still waiting for a frame are read again on the way back.
    if (this.stream?.deliveredId != null) {
      kept = { labels: JSON.stringify(this.labels), states: this.states, lastEventId: this.stream.deliveredId };
    }
    this.stream?.close();
    this.table.destroy();
  }
}
