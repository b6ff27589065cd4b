// The console's shell: sign-in, the views (one per location hash), the confirmation dialog,
// error toasts, and the header's live revision.

import { api, ApiError, HeadFollower, hasToken, onUnauthorized, setToken } from "./api.js";
import { append, fmtCount, h, replace } from "./dom.js";
import { ExecutionsView, ExecutionView } from "./executions.js";
import { FlowsView, FlowView } from "./flows.js";
import { HistoryView } from "./history.js";
import { ServerView } from "./server.js";
import { forgetStates, StatesView } from "./states.js";

const main = document.getElementById("main");
const serverLine = document.getElementById("server-line");
const signOut = document.getElementById("sign-out");
const toasts = document.getElementById("toasts");

const head = new HeadFollower();
let view = null;
let info = null;
let signingIn = null;

/** What every view may use. */
const ctx = {
  head,
  toast,
  confirm: confirmAction,
  /** Change the location's query without making a new view (filters). */
  replaceQuery(path, params) {
    const query = params.toString();
    history.replaceState(null, "", `#${path}${query ? `?${query}` : ""}`);
  },
};

/** Show an error (an ApiError or any message) for a while, over the page. */
function toast(error, context = "") {
  const text = error instanceof ApiError ? error.toString() : String(error?.message ?? error);
  const close = h("button", { type: "button", class: "quiet", "aria-label": "Dismiss" }, "×");
  const item = h("div", { class: "toast" }, h("span", {}, context ? `${context}: ${text}` : text), close);
  const remove = () => item.remove();
  close.addEventListener("click", remove);
  setTimeout(remove, 10_000);
  toasts.append(item);
  while (toasts.children.length > 4) toasts.firstElementChild.remove();
}

// -- routes ------------------------------------------------------------------------------------

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/states";
  const [path, query = ""] = raw.split("?", 2);
  const parts = path.split("/").filter(Boolean);
  let id = null;
  if (parts.length > 1) {
    try {
      id = decodeURIComponent(parts.slice(1).join("/"));
    } catch {
      id = parts.slice(1).join("/");
    }
  }
  return { name: parts[0] ?? "states", id, params: new URLSearchParams(query) };
}

function makeView({ name, id, params }) {
  switch (name) {
    case "states":
      return id === null ? new StatesView(ctx, params) : new HistoryView(ctx, id, params);
    case "flows":
      return id === null ? new FlowsView(ctx, params) : new FlowView(ctx, id);
    case "executions":
      return id === null ? new ExecutionsView(ctx, params) : new ExecutionView(ctx, id);
    case "server":
      return new ServerView(ctx, info);
    default:
      return null;
  }
}

function mount(moveFocus) {
  view?.destroy();
  view = null;
  const route = parseHash();
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.view === route.name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  view = makeView(route);
  if (view === null) {
    replace(main, h("section", { class: "view" }, h("h1", { tabindex: -1 }, "No such page"),
      h("p", {}, "Choose a view above.")));
    return;
  }
  replace(main, view.el);
  document.title = `${view.title ?? "flowstate"} · flowstate console`;
  if (moveFocus) (main.querySelector("h1") ?? main).focus({ preventScroll: true });
}

// -- the header ------------------------------------------------------------------------------

function showServerLine(rev, error) {
  replace(serverLine,
    error
      ? h("span", { class: "conn bad", title: error.toString() }, "○ offline")
      : h("span", { class: "conn ok" }, "● live"),
    info ? h("span", { class: "driver" }, info.driver) : null,
    h("span", { class: "rev" }, rev === null ? "rev …" : `rev ${fmtCount(rev)}`));
}

// -- sign-in -----------------------------------------------------------------------------------

function signIn(message = "") {
  if (signingIn) return signingIn;
  const dialog = document.getElementById("login");
  const form = document.getElementById("login-form");
  const input = document.getElementById("login-token");
  const errorLine = document.getElementById("login-error");
  const submit = document.getElementById("login-submit");
  errorLine.textContent = message;
  input.value = "";
  signingIn = new Promise((resolve) => {
    const onSubmit = async (event) => {
      event.preventDefault();
      const given = input.value.trim();
      if (!given) return;
      submit.disabled = true;
      errorLine.textContent = "";
      setToken(given);
      try {
        info = await api("api/v1/info");
        form.removeEventListener("submit", onSubmit);
        dialog.close();
        signingIn = null;
        resolve();
      } catch (error) {
        setToken(null);
        errorLine.textContent = error.status === 401
          ? "The server refused this token."
          : `The server did not answer: ${error}`;
        input.select();
      } finally {
        submit.disabled = false;
      }
    };
    form.addEventListener("submit", onSubmit);
  });
  if (!dialog.open) dialog.showModal();
  input.focus();
  return signingIn;
}

// Nothing works without the token: Escape does not close the sign-in dialog.
document.getElementById("login").addEventListener("cancel", (event) => event.preventDefault());

onUnauthorized(async () => {
  if (signingIn) return;
  head.stop();
  view?.destroy();
  view = null;
  forgetStates();
  replace(main, h("p", { class: "loading" }, "Signed out."));
  await signIn(hasToken() ? "The server refused the token; sign in again." : "");
  start();
});

signOut.addEventListener("click", async () => {
  setToken(null);
  head.stop();
  view?.destroy();
  view = null;
  forgetStates();
  replace(main, h("p", { class: "loading" }, "Signed out."));
  await signIn();
  start();
});

// -- confirmation --------------------------------------------------------------------------

/**
 * Ask before an action; run it on confirmation. Enter confirms, Escape (or the other button)
 * leaves everything as it is. An error of the action shows in the dialog, which stays open.
 * Resolves to the action's result, or null when the user backed out.
 */
function confirmAction({ title, text, ok, extra = null, run }) {
  const dialog = document.getElementById("confirm");
  const form = document.getElementById("confirm-form");
  const okButton = document.getElementById("confirm-ok");
  const cancelButton = document.getElementById("confirm-cancel");
  const errorLine = document.getElementById("confirm-error");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  replace(document.getElementById("confirm-extra"), extra);
  okButton.textContent = ok;
  errorLine.textContent = "";
  return new Promise((resolve) => {
    let result = null;
    const finish = () => {
      form.removeEventListener("submit", onSubmit);
      cancelButton.removeEventListener("click", onCancel);
      dialog.removeEventListener("close", finish);
      resolve(result);
    };
    const onCancel = () => dialog.close();
    const onSubmit = async (event) => {
      event.preventDefault();
      okButton.disabled = true;
      errorLine.textContent = "";
      try {
        result = await run();
        dialog.close();
      } catch (error) {
        errorLine.textContent = error instanceof ApiError ? error.toString() : String(error.message ?? error);
      } finally {
        okButton.disabled = false;
      }
    };
    form.addEventListener("submit", onSubmit);
    cancelButton.addEventListener("click", onCancel);
    dialog.addEventListener("close", finish);
    dialog.showModal();
    (extra?.querySelector?.("input, textarea") ?? okButton).focus();
  });
}

// -- start -----------------------------------------------------------------------------------

let headUnsubscribe = null;

function start() {
  signOut.hidden = !hasToken();
  headUnsubscribe?.();
  headUnsubscribe = head.subscribe(showServerLine);
  head.start();
  mount(false);
}

async function boot() {
  let health;
  try {
    health = await api("health", { public: true });
  } catch (error) {
    replace(main, h("section", { class: "view" }, h("h1", {}, "The server does not answer"),
      h("p", { class: "error", role: "alert" }, error.toString()),
      h("button", { type: "button", onclick: () => location.reload() }, "Try again")));
    return;
  }
  if (health.token_required && !hasToken()) {
    replace(main, h("p", { class: "loading" }, "Sign in to continue."));
    await signIn();
  } else {
    try {
      info = await api("api/v1/info");
    } catch (error) {
      if (error.status !== 401) toast(error, "server information");
      else return; // onUnauthorized signs in again and starts
    }
  }
  start();
}

window.addEventListener("hashchange", () => {
  if (!signingIn) mount(true);
});

append(serverLine, h("span", { class: "rev" }, "rev …"));
boot();
