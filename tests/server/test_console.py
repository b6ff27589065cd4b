"""The console, as a person uses it: a real Chromium on a real ``flowstate serve`` (SQLite, with
a token), signing in, listing states, reading a history while a commit arrives, acting on
managed flows, reading an execution's attempts, and watching the stream come back after the
server restarts. Every tab must log no error, except the ones a test provokes and names.

One server and one browser serve the module; each test has a tab of its own and works on
states no other test changes.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

import flowstate as fs
from flowstate.drivers.http import HTTPDriver
from flowstate.workflows import FlowManager, StepObservation
from tests.serve_process import ServeProcess
from tests.server.console_browser import TOKEN, ConsolePage, in_thread, token_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]

TASKS = "tests.server.pipeline_tasks:TASKS"
FLOWS = "tests.recovery.process_flows:flows"
OWNER = "ops:console"
TOKEN_HEADER = [(b"Authorization", f"Bearer {TOKEN}".encode())]

NewTab = Callable[[ServeProcess], ConsolePage]


@contextlib.asynccontextmanager
async def engine_of(server: ServeProcess) -> AsyncIterator[fs.Engine]:
    """An engine storing through the server (the engine leaves a driver it was given open)."""
    async with HTTPDriver(server.url, token=TOKEN) as driver, fs.Engine(driver) as engine:
        yield engine


async def seed(server: ServeProcess) -> str:
    """States, a history long enough for two pages, managed flows and one pipeline run
    (whose id is returned)."""
    async with engine_of(server) as engine:
        orders = [
            fs.StateCtx.new(f"order-{i}", labels={"kind": "order", "region": "eu"})
            for i in range(1, 31)
        ]
        invoices = [
            fs.StateCtx.new(f"invoice-{i}", labels={"kind": "invoice"}) for i in range(1, 11)
        ]
        await engine.do(fs.Commit(*(fs.Transit(c, "charge") for c in orders + invoices)))
        for invoice in invoices[:3]:
            await engine.do(fs.Commit(fs.Pause(invoice)))

        order = orders[6]  # order-7: charged, then paused on its way to shipping
        order.current.labels["paid"] = "true"
        order.current.annotations["charged"] = "yes"
        await engine.do(fs.Commit(fs.Transit(order, "ship")))
        await engine.do(fs.Commit(fs.Pause(order)))

        long = fs.StateCtx.new("long-history", labels={"kind": "long"})
        for i in range(1, 61):
            long.current.annotations["counter"] = str(i)
            await engine.do(fs.Commit(fs.Transit(long, "tick")))

        flows = FlowManager(engine)
        for name in ("flow-cancel", "flow-request", "flow-resume", "flow-race"):
            await flows.create(
                id=name,
                controller="console/tests",
                goal=f"{name} goal",
                owner=OWNER,
                origin="tests",
                current_step="review",
                state={"items": 3},
            )
            await flows.start(name)
            observed = StepObservation(
                flow_id=name, run_id="r1", task="fetch", status="completed", result={"rows": 3}
            )
            await flows.record_step(observed)
            await flows.record_step(
                StepObservation(flow_id=name, run_id="r2", task="review", status="running")
            )
            if name != "flow-request":
                await flows.wait(name, {"kind": "approval", "who": "ops"})

        definition = {
            "flow": {
                "id": "console-pipeline",
                "name": "Fetch, retry, store",
                "start_task": "task1",
                "tasks": [{"name": "task1"}, {"name": "flaky", "retries": 1}],
                "conditions": [
                    {
                        "name": "after_task1",
                        "source_task": "task1",
                        "outcome": "success",
                        "target_task_success": "flaky",
                        "target_task_failure": "end",
                    }
                ],
            },
            "input": {"rows": 21},
            "owner": "shop",
        }
        async with httpx.AsyncClient(base_url=server.url, headers=TOKEN_HEADER) as client:
            response = await client.post("/api/v1/flows/execute", json=definition)
            assert response.status_code == 202, response.text
            run_id: str = response.json()["execution_id"]
        done = await flows.result(run_id, timeout=30)
        assert done.status == "finished"
        return run_id


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, str]]:
    """The module's server, its store seeded, and the id of its pipeline run."""
    directory = tmp_path_factory.mktemp("console")
    args = ("--tasks", TASKS, "--recover", "--flows", FLOWS, "--retry-after", "3600")
    server = token_server(directory, f"sqlite:///{directory}/store.db", *args)
    try:
        run_id = in_thread(lambda: seed(server))
        yield server, run_id
    finally:
        server.close()


@pytest.fixture(scope="module")
def server(served: tuple[ServeProcess, str]) -> ServeProcess:
    return served[0]


def shown_keys(tab: ConsolePage) -> list[str]:
    keys: list[str] = tab.page.eval_on_selector_all(
        ".vt-row:not([hidden])", "rows => rows.map(r => r.dataset.key)"
    )
    return keys


# -- signing in, the states list ------------------------------------------------------------


def test_sign_in_and_list_states(server: ServeProcess, new_tab: NewTab) -> None:
    tab = new_tab(server)
    page = tab.page
    page.goto(f"{server.url}/")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-token")).to_be_focused()

    page.fill("#login-token", "not the token")
    with tab.expect_error(r"status of 401"):  # the browser logs the refusal
        page.keyboard.press("Enter")
    expect(page.locator("#login-error")).to_have_text("The server refused this token.")

    page.fill("#login-token", TOKEN)
    page.keyboard.press("Enter")
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator(".status-line .conn")).to_have_text("● live")
    # 30 orders, 10 invoices, the long history, the flows and their steps, and more.
    page.wait_for_function(
        "document.querySelector('.status-line .count').textContent.split(' ')[0] >= 46"
    )
    expect(page.locator(".status-line .count")).to_have_text(re.compile(r"^(\d+) of \1 states$"))
    expect(page.locator("#server-line")).to_contain_text("sqlite")
    tab.screenshot("states-list")

    # Labels filter on the server (the watch restarts), status and id in the page.
    page.fill("#label-filter", "kind=invoice")
    page.keyboard.press("Enter")
    expect(page.locator(".chip .mono")).to_have_text(["kind=invoice"])
    expect(page.locator(".status-line .count")).to_have_text("10 of 10 states")
    assert sorted(shown_keys(tab)) == sorted(f"invoice-{i}" for i in range(1, 11))
    page.select_option("#status-filter", "paused")
    expect(page.locator(".status-line .count")).to_have_text("3 of 10 states")
    assert sorted(shown_keys(tab)) == ["invoice-1", "invoice-2", "invoice-3"]
    expect(page.locator(".vt-row:not([hidden]) .badge").first).to_have_text("paused")
    page.fill("#id-filter", "invoice-2")
    expect(page.locator(".status-line .count")).to_have_text("1 of 10 states")

    # The filters are in the address (a reload keeps them); the token never is, and the tab
    # keeps it across a reload without asking again.
    assert "label=kind%3Dinvoice" in page.url
    assert TOKEN not in page.url
    assert "t%C3%B8ken" not in page.url
    assert page.evaluate("sessionStorage.getItem('flowstate.console.token')") == TOKEN
    page.reload()
    expect(page.locator(".status-line .count")).to_have_text("1 of 10 states")
    expect(page.locator("#login")).to_be_hidden()

    page.click("#sign-out")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('flowstate.console.token')") is None


def test_keyboard_opens_a_history_from_the_list(server: ServeProcess, new_tab: NewTab) -> None:
    tab = new_tab(server)
    page = tab.page
    tab.open("/states?label=kind%3Dorder")
    expect(page.locator(".status-line .count")).to_have_text("30 of 30 states")
    page.focus("#id-filter")
    page.keyboard.press("Tab")
    first, second = shown_keys(tab)[:2]
    expect(page.locator(f'.vt-row[data-key="{first}"] a')).to_be_focused()
    page.keyboard.press("ArrowDown")
    expect(page.locator(f'.vt-row[data-key="{second}"] a')).to_be_focused()
    page.keyboard.press("End")
    last = page.locator('.vt-row[data-key="order-1"] a')
    expect(last).to_be_focused()  # order-1 changed first: it is last
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("order-1")
    expect(page.locator("li.version")).to_have_count(1)
    page.go_back()
    expect(page.locator(".status-line .count")).to_have_text("30 of 30 states")


def test_the_list_holds_still_while_the_reader_looks(server: ServeProcess, new_tab: NewTab) -> None:
    """Rows do not move under the reader: while the pointer is on the list, or it is scrolled
    down, a new version changes its row in place; the newest-first order comes back when the
    pointer leaves, or on request."""

    async def commit(*ids: str) -> int:
        async with engine_of(server) as engine:
            ctxs = []
            for state_id in ids:
                try:
                    ctxs.append(await engine.get_state(state_id))
                except fs.NotFoundError:
                    ctxs.append(fs.StateCtx.new(state_id, labels={"kind": "hold"}))
            await engine.do(fs.Commit(*(fs.Transit(ctx, "next") for ctx in ctxs)))
            return ctxs[-1].committed.rev

    in_thread(lambda: commit(*(f"hold-{i:02d}" for i in range(1, 41))))
    tab = new_tab(server)
    page = tab.page
    tab.open("/states?label=kind%3Dhold")
    count = page.locator(".status-line .count")
    held = page.locator(".status-line .held")
    expect(count).to_have_text("40 of 40 states")
    order = shown_keys(tab)
    assert order[:3] == ["hold-40", "hold-39", "hold-38"]
    top = page.locator('.vt-row[data-key="hold-40"]')
    before = top.bounding_box()

    page.hover('.vt-row[data-key="hold-39"]')
    rev = in_thread(lambda: commit("hold-38"))
    expect(page.locator('.vt-row[data-key="hold-38"] .vt-cell').nth(3)).to_have_text(str(rev))
    expect(held).to_have_text("order held while you look: 1 change waits")
    assert shown_keys(tab) == order, "rows changed in place"
    assert top.bounding_box() == before

    page.hover("#id-filter")  # the pointer leaves: newest first again
    expect(held).to_have_text("")
    assert shown_keys(tab)[:3] == ["hold-38", "hold-40", "hold-39"]

    # Scrolled down, the order holds with the pointer elsewhere; "Show newest first" goes up.
    page.locator(".vt-scroll").evaluate("scroller => { scroller.scrollTop = 240; }")
    expect(page.locator('.vt-row[data-key="hold-30"]')).to_be_in_viewport()
    in_thread(lambda: commit("hold-30"))
    newest = page.get_by_role("button", name="Show newest first")
    expect(newest).to_be_visible()
    expect(page.locator('.vt-row[data-key="hold-30"]')).to_be_in_viewport()
    newest.click()
    expect(newest).to_be_hidden()
    assert shown_keys(tab)[:2] == ["hold-30", "hold-38"]
    assert page.locator(".vt-scroll").evaluate("scroller => scroller.scrollTop") == 0


# -- a state's history ---------------------------------------------------------------------------


def test_history_shows_each_change_and_follows_a_new_commit(
    server: ServeProcess, new_tab: NewTab
) -> None:
    tab = new_tab(server)
    page = tab.page
    tab.open("/states/order-7")
    expect(page.locator("h1")).to_have_text("order-7")
    cards = page.locator("li.version")
    expect(cards).to_have_count(3)
    expect(cards.nth(0)).to_contain_text("created")
    expect(cards.nth(0).locator(".changes .added")).to_have_text(["+kind = order", "+region = eu"])
    expect(cards.nth(1)).to_contain_text("charge → ship")
    expect(cards.nth(1).locator(".changes .added")).to_have_text(["+paid = true", "+charged = yes"])
    expect(cards.nth(2)).to_contain_text("stays at ship")
    expect(cards.nth(2).locator(".badge").first).to_have_text("paused")
    expect(page.locator(".page-text")).to_have_text("versions 1–3 of 3 · page 1 of 1")
    expect(page.locator(".toolbar .conn")).to_have_text("● live")

    page.evaluate("window.notReloaded = true")

    async def ship() -> int:
        async with engine_of(server) as engine:
            ctx = await engine.get_state("order-7")
            ctx.current.annotations["carrier"] = "post"
            del ctx.current.labels["paid"]
            await engine.do(fs.Commit(fs.End(ctx)))
            return ctx.committed.rev

    rev = in_thread(ship)
    expect(cards).to_have_count(4)
    newest = cards.nth(3)
    expect(newest).to_have_attribute("data-rev", str(rev))
    expect(newest).to_contain_text("ship → no flow (ended)")
    expect(newest.locator(".changes .added")).to_have_text(["+carrier = post"])
    expect(newest.locator(".changes .removed")).to_have_text(
        ["−paid was true", "−flowstate.paused was true"]
    )
    expect(page.locator(".summary .badge").first).to_have_text("ended")
    expect(page.locator(".page-text")).to_have_text("versions 1–4 of 4 · page 1 of 1")
    assert page.evaluate("window.notReloaded") is True, "the page was not reloaded"
    expect(page.locator("#server-line .rev")).to_have_text(f"rev {rev}")
    tab.screenshot("history")


def test_a_long_history_pages(server: ServeProcess, new_tab: NewTab) -> None:
    tab = new_tab(server)
    page = tab.page
    tab.open("/states/long-history")
    cards = page.locator("li.version")
    # It opens on the newest page; its first version is compared with the last of page 1.
    expect(page.locator(".page-text")).to_have_text("versions 51–60 of 60 · page 2 of 2")
    expect(cards).to_have_count(10)
    expect(cards.nth(0).locator(".vnum")).to_have_text("#51")
    expect(cards.nth(0).locator(".changes .changed")).to_have_text(["~counter: 50 → 51"])
    expect(page.get_by_role("button", name="Newer versions")).to_be_disabled()
    page.get_by_role("button", name="Older versions").click()
    expect(page.locator(".page-text")).to_have_text("versions 1–50 of 60 · page 1 of 2")
    expect(cards).to_have_count(50)
    expect(cards.nth(0)).to_contain_text("created")
    expect(cards.nth(49).locator(".changes .changed")).to_have_text(["~counter: 49 → 50"])
    page.get_by_role("button", name="Latest page").click()
    expect(page.locator(".page-text")).to_have_text("versions 51–60 of 60 · page 2 of 2")


# -- managed flows -------------------------------------------------------------------------------


def flow_status(server: ServeProcess, flow_id: str) -> tuple[str, bool]:
    response = httpx.get(f"{server.url}/api/v1/flows/{flow_id}", headers=TOKEN_HEADER)
    flow = response.json()
    return flow["status"], flow["cancel_requested"]


def test_cancel_a_managed_flow(server: ServeProcess, new_tab: NewTab) -> None:
    tab = new_tab(server)
    page = tab.page
    tab.open(f"/flows?owner={OWNER}")
    expect(page.locator(".status-line .count")).to_have_text("4 managed flows")
    page.locator('.vt-row[data-key="flow-cancel"] a').click()
    expect(page.locator("h1")).to_have_text("flow-cancel")
    status = page.locator(".detail-side .fields .badge").first
    expect(status).to_have_text("waiting")
    steps = page.locator("table.fixed").nth(0)
    expect(steps.locator("tbody tr")).to_have_count(2)
    expect(steps.locator("tbody tr").nth(0)).to_contain_text('{"rows":3}')
    events = page.locator("table.fixed").nth(1).locator("tbody tr")
    expect(events).to_have_count(5)
    expect(events.locator("td:nth-child(3)")).to_have_text(
        ["created", "started", "step_observed", "step_observed", "waiting"]
    )
    tab.screenshot("flow")

    cancel = page.locator('button[data-action="cancel"]')
    dialog = page.locator("#confirm")
    cancel.click()
    expect(dialog).to_be_visible()
    expect(page.locator("#confirm-title")).to_have_text("Cancel this flow?")
    page.keyboard.press("Escape")  # leaves it as it is
    expect(dialog).to_be_hidden()
    assert flow_status(server, "flow-cancel") == ("waiting", False)

    cancel.click()
    expect(page.locator("#confirm-ok")).to_be_focused()
    page.keyboard.press("Enter")  # confirms
    expect(dialog).to_be_hidden()
    expect(status).to_have_text("cancelled")
    expect(events.last.locator("td:nth-child(3)")).to_have_text("cancelled")
    expect(cancel).to_be_disabled()
    assert flow_status(server, "flow-cancel") == ("cancelled", False)


def test_request_cancel_and_resume(server: ServeProcess, new_tab: NewTab) -> None:
    tab = new_tab(server)
    page = tab.page
    tab.open("/flows/flow-request")
    expect(page.locator(".detail-side .fields .badge").first).to_have_text("running")
    expect(page.locator('button[data-action="resume"]')).to_be_disabled()
    page.click('button[data-action="request-cancel"]')
    page.keyboard.press("Enter")
    expect(page.locator(".detail-side .badge.cancel")).to_have_text("cancel asked")
    expect(page.locator('button[data-action="request-cancel"]')).to_be_disabled()
    assert flow_status(server, "flow-request") == ("running", True)

    page.goto(f"{server.url}/#/flows/flow-resume")
    expect(page.locator("h1")).to_have_text("flow-resume")
    page.click('button[data-action="resume"]')
    expect(page.locator("#resume-patch")).to_be_focused()
    page.keyboard.type('{"approved": [1, 2')  # not JSON: refused in the dialog
    page.keyboard.press("Enter")
    expect(page.locator("#confirm-error")).to_contain_text("the patch is not JSON")
    page.fill("#resume-patch", '{"approved": true}')
    page.keyboard.press("Enter")
    expect(page.locator("#confirm")).to_be_hidden()
    expect(page.locator(".detail-side .fields .badge").first).to_have_text("running")
    expect(page.locator("pre.json")).to_contain_text('"approved": true')
    assert flow_status(server, "flow-resume") == ("running", False)


def test_a_refused_move_shows_the_servers_error(server: ServeProcess, new_tab: NewTab) -> None:
    tab = new_tab(server)
    page = tab.page
    tab.open("/flows/flow-race")
    expect(page.locator(".detail-side .fields .badge").first).to_have_text("waiting")
    page.click('button[data-action="resume"]')
    expect(page.locator("#confirm")).to_be_visible()

    async def cancel_meanwhile() -> None:
        async with engine_of(server) as engine:
            await FlowManager(engine).cancel("flow-race")

    in_thread(cancel_meanwhile)
    with tab.expect_error(r"status of 409"):
        page.keyboard.press("Enter")
    expect(page.locator("#confirm-error")).to_have_text(
        re.compile(r"^already_terminal: .*flow-race.*cancelled")
    )
    expect(page.locator("#confirm")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#confirm")).to_be_hidden()
    expect(page.locator(".detail-side .fields .badge").first).to_have_text("cancelled")


def test_the_flows_list_follows_changes(server: ServeProcess, new_tab: NewTab) -> None:
    tab = new_tab(server)
    page = tab.page
    tab.open("/flows?owner=ops%3Alive&status=waiting")
    expect(page.locator(".status-line .count")).to_have_text("0 managed flows")
    expect(page.locator(".status-line .conn")).to_have_text("● live")

    async def change(step: str) -> None:
        async with engine_of(server) as engine:
            flows = FlowManager(engine)
            if step == "create":
                await flows.create(id="flow-live", controller="c", owner="ops:live")
                await flows.start("flow-live")
                await flows.wait("flow-live", {"kind": "approval"})
            else:
                await flows.resume("flow-live")

    in_thread(lambda: change("create"))
    row = page.locator('.vt-row[data-key="flow-live"]')
    expect(row.locator(".badge")).to_have_text("waiting")
    in_thread(lambda: change("resume"))
    # No longer waiting: it leaves a list of waiting flows, as the API's own list does.
    expect(page.locator(".status-line .count")).to_have_text("0 managed flows")
    page.select_option("#filter-status", "")
    expect(row.locator(".badge")).to_have_text("running")


# -- executions, recovery, errors ------------------------------------------------------------


def test_an_execution_shows_every_attempt(
    served: tuple[ServeProcess, str], new_tab: NewTab
) -> None:
    server, run_id = served
    tab = new_tab(server)
    page = tab.page
    tab.open("/executions?flow_id=console-pipeline")
    expect(page.locator(".status-line .count")).to_have_text("1 executions")
    row = page.locator(f'.vt-row[data-key="{run_id}"]')
    expect(row.locator(".badge")).to_have_text("finished")
    row.locator("a").click()
    expect(page.locator("h1")).to_have_text(run_id)
    flaky = page.locator("section.task", has_text="flaky")
    expect(flaky.locator("h3")).to_contain_text("2 attempts")
    attempts = flaky.locator("tbody tr")
    expect(attempts).to_have_count(2)
    expect(attempts.nth(0).locator(".badge")).to_have_text("failed")
    expect(attempts.nth(0)).to_contain_text("the first attempt always fails")
    expect(attempts.nth(1).locator(".badge")).to_have_text("completed")
    expect(attempts.nth(1)).to_contain_text("ok on attempt 2")
    task1 = page.locator("section.task", has_text="task1")
    expect(task1.locator("tbody tr")).to_contain_text('{"rows":21}')
    expect(page.locator("pre.json")).to_contain_text('"rows": 21')
    tab.screenshot("execution")


def test_the_recovery_services(server: ServeProcess, new_tab: NewTab) -> None:
    tab = new_tab(server)
    page = tab.page
    tab.open("/server")
    recoverer = page.locator("section.service", has_text="Recoverer")
    expect(recoverer.locator("h2")).to_contain_text("this server leads")
    expect(recoverer.locator("tbody tr")).to_contain_text(["added", "completed", "retried"])
    leader = recoverer.locator(".fields dd").nth(0)
    holder = recoverer.locator(".fields dd").nth(1)
    expect(leader).to_have_text(holder.inner_text())
    expect(page.locator("section.service", has_text="Delayer").locator("h2")).to_contain_text(
        "this server leads"
    )


def test_errors_of_the_api_show_in_the_page(server: ServeProcess, new_tab: NewTab) -> None:
    tab = new_tab(server)
    page = tab.page
    with tab.expect_error(r"status of 404"):
        tab.open("/states/no-such-state")
    expect(page.locator(".timeline .error")).to_have_text(
        re.compile(r"^Cannot read this history: not_found: .*no-such-state")
    )
    with tab.expect_error(r"status of 404"):
        page.goto(f"{server.url}/#/flows/no-such-flow")
    expect(page.locator(".detail .error")).to_have_text(
        re.compile(r"^Cannot read this flow: not_found: .*no-such-flow")
    )
    with tab.expect_error(r"status of 404"):
        page.goto(f"{server.url}/#/executions/no-such-run")
    expect(page.locator(".detail .error")).to_have_text(
        re.compile(r"^Cannot read this execution: not_found: .*no-such-run")
    )


# -- the stream comes back ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_list_resumes_after_the_server_restarts(tmp_path: Path, new_tab: NewTab) -> None:
    """The server goes away and comes back; the page reconnects with Last-Event-ID and gets
    what was committed meanwhile, without a reload."""
    store = f"sqlite:///{tmp_path}/store.db"
    port = str(free_port())
    server = token_server(tmp_path, store, "--port", port)
    try:

        async def first() -> int:
            async with engine_of(server) as engine:
                ctxs = [fs.StateCtx.new(f"drop-{i}", labels={"kind": "drop"}) for i in (1, 2, 3)]
                await engine.do(fs.Commit(*(fs.Transit(c, "a") for c in ctxs)))
                return ctxs[-1].committed.rev

        last_seen = in_thread(first)
        tab = new_tab(server)
        page = tab.page
        resumed_from: list[str | None] = []
        page.on(
            "request",
            lambda request: (
                resumed_from.append(request.headers.get("last-event-id"))
                if "/api/v1/watch" in request.url
                else None
            ),
        )
        tab.open("/states?label=kind%3Ddrop")
        expect(page.locator(".status-line .count")).to_have_text("3 of 3 states")

        assert server.stop(signal.SIGTERM) == 0
        server.close()
        expect(page.locator(".status-line .conn")).to_contain_text("retrying")

        async def meanwhile() -> int:
            # Straight into the store file, while no server runs.
            async with fs.Engine(store) as engine:
                ctx = await engine.get_state("drop-1")
                await engine.do(fs.Commit(fs.Transit(ctx, "b")))
                new = fs.StateCtx.new("drop-4", labels={"kind": "drop"})
                await engine.do(fs.Commit(fs.Transit(new, "a")))
                return ctx.committed.rev

        moved = in_thread(meanwhile)
        server = token_server(tmp_path, store, "--port", port)
        expect(page.locator(".status-line .count")).to_have_text("4 of 4 states", timeout=30_000)
        expect(page.locator(".status-line .conn")).to_have_text("● live")
        row = page.locator('.vt-row[data-key="drop-1"]')
        expect(row.locator(".vt-cell").nth(3)).to_have_text(str(moved))
        expect(page.locator("#server-line .conn")).to_have_text("● live")
        assert resumed_from[0] is None
        assert str(last_seen) in resumed_from[1:], resumed_from
        # While the server was away, the browser logged the connections it could not make.
        tab.take_errors(r"net::ERR_")
    finally:
        server.close()
