// The server: what it is, its store's revision, and the recovery services it runs
// (`flowstate serve --recover`): who leads them and their counters, read every two seconds.

import { api } from "./api.js";
import { fmtCount, h, replace } from "./dom.js";
import { fields } from "./flows.js";

const EVERY = 2000;

function service(title, info) {
  if (!info) return h("section", { class: "service" }, h("h2", {}, title), h("p", { class: "note" }, "Not running here."));
  const leader = info.leader === null
    ? h("span", { class: "badge status-failed" }, "no leader")
    : h("span", { class: "mono" }, info.leader);
  return h("section", { class: "service", "aria-label": title },
    h("h2", {}, title, " ", info.is_leader
      ? h("span", { class: "badge status-running" }, "this server leads")
      : h("span", { class: "badge status-paused" }, "standing by")),
    fields([
      ["Leader", leader],
      ["This server", h("span", { class: "mono" }, info.holder)],
    ]),
    h("table", { class: "fixed counters" },
      h("caption", { class: "note" }, "Counters since the server started"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Counter"), h("th", { scope: "col", class: "num" }, "Value"))),
      h("tbody", {}, Object.entries(info.stats).map(([name, value]) =>
        h("tr", {}, h("td", {}, name.replaceAll("_", " ")), h("td", { class: "num" }, fmtCount(value)))))));
}

export class ServerView {
  constructor(ctx, info) {
    this.ctx = ctx;
    this.title = "Server";
    this.info = info;
    this.controller = new AbortController();
    this.about = h("div", {});
    this.recovery = h("div", { class: "services" }, h("p", { class: "loading" }, "Loading…"));
    this.el = h("section", { class: "view view-scroll" },
      h("div", { class: "view-head" }, h("h1", { tabindex: -1 }, "Server")),
      this.about,
      h("h2", {}, "Recovery"),
      this.recovery);
    this.unsubscribe = ctx.head.subscribe((rev) => this.showAbout(rev));
    this.poll();
  }

  showAbout(rev) {
    const info = this.info;
    replace(this.about, fields([
      ["Version", info ? `flowstate ${info.version}` : null],
      ["Store", info ? h("span", { class: "mono" }, info.driver) : null],
      ["Revision", rev === null ? "…" : fmtCount(rev)],
      ["Largest request", info ? `${fmtCount(info.max_body_size)} bytes` : null],
      ["Largest page", info ? `${fmtCount(info.max_page)} versions` : null],
    ]));
  }

  async poll() {
    const signal = this.controller.signal;
    while (!signal.aborted) {
      try {
        const info = await api("api/v1/recovery", { signal });
        if (!info.enabled) {
          replace(this.recovery, h("p", { class: "note" },
            "This server runs no recovery service. Start it with --recover (and --flows) to run the recoverer and the delayer in it."));
        } else {
          replace(this.recovery, service("Recoverer", info.recoverer), service("Delayer", info.delayer));
        }
      } catch (error) {
        if (error.name === "AbortError") return;
        replace(this.recovery, h("p", { class: "error", role: "alert" }, `Cannot read the recovery services: ${error}`));
      }
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, EVERY);
        signal.addEventListener("abort", () => {
          clearTimeout(timer);
          resolve();
        }, { once: true });
      });
    }
  }

  destroy() {
    this.controller.abort();
    this.unsubscribe();
  }
}
