// Pipeline executions: the list (by status and pipeline) and one run with every attempt of
// every task: its status, when it ran, its output or its error.

import { api, segment } from "./api.js";
import { badge, clock, fmtCount, fmtDuration, fmtTime, h, replace, shorten, valueView } from "./dom.js";
import { DetailView, fields, fixedTable, flowLink, ListView } from "./flows.js";

const RUN_STATUSES = ["running", "finished", "failed", "cancelled"];

function executionLink(id) {
  return `#/executions/${segment(id)}`;
}

export class ExecutionsView extends ListView {
  constructor(ctx, params) {
    super(ctx, {
      title: "Executions",
      path: "/executions",
      filters: [
        { name: "status", title: "Status", value: params.get("status") ?? "", options: RUN_STATUSES },
        { name: "flow_id", title: "Pipeline", value: params.get("flow_id") ?? "", placeholder: "pipeline id" },
      ],
      columns: [
        { title: "Execution", width: "minmax(12rem, 2fr)", className: "mono" },
        { title: "Pipeline", width: "minmax(8rem, 1.2fr)", className: "mono" },
        { title: "Name", width: "minmax(8rem, 1.5fr)" },
        { title: "Status", width: "7.5rem" },
        { title: "Task", width: "minmax(7rem, 1fr)", className: "mono" },
        { title: "Started (UTC)", width: "13.5rem", className: "mono" },
        { title: "Took", width: "7rem", className: "num" },
      ],
      key: (run) => run.execution_id,
      order: (run) => Date.parse(run.updated_at),
      link: (run) => executionLink(run.execution_id),
      render: (cells, run) => {
        cells[0].textContent = run.execution_id;
        cells[0].title = run.execution_id;
        cells[1].textContent = run.flow_id;
        cells[2].textContent = run.name;
        cells[2].title = run.name;
        replace(cells[3], badge(run.status));
        cells[4].textContent = run.current_task;
        cells[5].textContent = fmtTime(run.created_at);
        cells[6].textContent = run.status === "running" ? "" : fmtDuration(run.created_at, run.updated_at);
      },
      load: async (values, since, initial, signal) => {
        const query = { ...values, since_rev: since, limit: 1000 };
        if (!initial) delete query.status; // see FlowsView: later reads must see runs leave
        const page = await api("api/v1/flows/executions", { query, signal });
        return { items: page.executions, more: page.more, cursor: page.last_rev };
      },
      matches: (run, values) => !values.status || run.status === values.status,
      empty: "No execution matches these filters.",
    });
  }
}

/** Attempts grouped by task, tasks in the order they first ran. */
function byTask(attempts) {
  const groups = new Map();
  for (const attempt of attempts) {
    if (!groups.has(attempt.task)) groups.set(attempt.task, []);
    groups.get(attempt.task).push(attempt);
  }
  return groups;
}

export class ExecutionView extends DetailView {
  constructor(ctx, id) {
    super(ctx, id);
    this.title = `Execution ${shorten(id, 40)}`;
    this.body = h("div", { class: "detail" }, h("p", { class: "loading" }, "Loading…"));
    this.el = h("section", { class: "view view-scroll" },
      h("div", { class: "view-head" },
        h("a", { href: "#/executions", class: "back" }, "← Executions"),
        h("h1", { tabindex: -1, class: "mono" }, id),
        this.live),
      this.body);
    this.reload();
  }

  async fetch(signal) {
    // The run as a managed flow gives the revision that the watch stream follows on from.
    const run = await api(`api/v1/flows/executions/${segment(this.id)}`, { signal });
    const flow = await api(`api/v1/flows/${segment(this.id)}`, { signal });
    return { run, revision: flow.revision };
  }

  revisionOf({ revision }) {
    return revision;
  }

  failed(error) {
    replace(this.body, h("p", { class: "error", role: "alert" }, `Cannot read this execution: ${error}`));
  }

  render({ run, revision }) {
    const state = run.state ?? {};
    const tasks = byTask(run.tasks ?? []);
    const outputs = state.outputs ?? {};
    const failure = state.failure;
    replace(this.body,
      h("div", { class: "detail-side" },
        fields([
          ["Status", badge(run.status)],
          ["Pipeline", h("span", { class: "mono" }, run.flow_id)],
          ["Name", run.name],
          ["Current task", h("span", { class: "mono" }, run.current_task)],
          ["Started", `${fmtTime(run.created_at)} UTC`],
          ["Updated", `${fmtTime(run.updated_at)} UTC`],
          ["Took", run.status === "running" ? null : fmtDuration(run.created_at, run.updated_at)],
          ["Revision", fmtCount(revision)],
          ["Failure", failure ? h("span", { class: "error-text" }, valueView(failure, 80)) : null],
        ]),
        h("p", { class: "links" },
          h("a", { href: flowLink(run.execution_id) }, "As a managed flow (resume, cancel)"),
          h("a", { href: `#/states/${segment(run.execution_id)}` }, "History of its state")),
        h("h2", {}, "Input"),
        h("pre", { class: "json" }, JSON.stringify(state.input ?? null, null, 2))),
      h("div", { class: "detail-main" },
        h("h2", {}, `Tasks (${fmtCount(tasks.size)}, ${fmtCount((run.tasks ?? []).length)} attempts)`),
        tasks.size ? [...tasks].map(([task, attempts]) => {
          const last = attempts[attempts.length - 1];
          return h("section", { class: "task", "aria-label": `Task ${task}` },
            h("h3", {}, h("span", { class: "mono" }, task), " ", badge(last.status),
              h("span", { class: "note" }, ` ${attempts.length} attempt${attempts.length === 1 ? "" : "s"}`)),
            fixedTable(`Attempts of ${task}`, [
              { title: "Attempt", className: "c-num" },
              { title: "Status", className: "c-status" },
              { title: "Started", className: "c-time" },
              { title: "Took", className: "c-num" },
              { title: "Output or error", className: "c-wide" },
            ], attempts.map((a) => [
              String(a.attempt),
              badge(a.status),
              h("span", { class: "mono" }, clock(a.started_at ?? a.created_at)),
              fmtDuration(a.started_at ?? a.created_at, a.ended_at),
              a.error
                ? h("span", { class: "error-text" }, valueView(a.error, 100))
                : valueView(a.result ?? outputs[task] ?? null, 100),
            ]), "No attempt yet."));
        }) : h("p", { class: "note" }, "No task has started yet.")));
  }
}
