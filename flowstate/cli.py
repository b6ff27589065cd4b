"""The ``flowstate`` command: try flowstate, look into a store, run its services.

``flowstate demo`` runs a small workflow; ``states``, ``get`` and ``watch`` read any store
named by a driver URL; ``recover`` runs the recovery service. Also runnable as
``python -m flowstate``. No command prints a Python traceback: errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from attrs import frozen

import flowstate as fs
from flowstate._checks import MAX_REV
from flowstate._query import MAX_LIMIT
from flowstate.drivers.base import hide_password
from flowstate.drivers.memory import MemoryDriver
from flowstate.drivers.sqlite import SQLiteDriver
from flowstate.recovery import _serve as recover_service
from flowstate.server import _cli as serve_command
from flowstate.workflows import (
    FlowEvent,
    FlowManager,
    FlowStatus,
    Pipeline,
    StepFn,
    Worker,
    workflow_flows,
)
from flowstate.workflows._model import events_of, flow_of, is_flow

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from flowstate.drivers.base import Driver

__all__ = ["COMMANDS", "Command", "main"]

PROG = "flowstate"
DEMO_URL = "sqlite:///flowstate-demo.db"

# Exit codes: 0 success, 1 an error the user can fix (bad URL, unknown id, ...), 2 a bad
# command line (argparse's own code), 130 interrupted by Ctrl-C (what shells report for SIGINT).
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_json = msgspec.json.Encoder()

DESCRIPTION = """\
flowstate is an asyncio state and workflow engine. This command tries it out, looks into a
store from the shell and runs flowstate's services: see the commands below.

A store is named by a driver URL:
  sqlite:///relative/path.db    a SQLite file, relative to the current directory
  sqlite:////absolute/path.db   a SQLite file, absolute path
  memory://                     an empty in-memory store (gone when the command ends)
  etcd://host:2379/prefix       an etcd cluster (needs: pip install 'flowstate-engine[etcd]')
  postgresql://user@host:5432/db?schema=flowstate
                                a PostgreSQL database (password: $PGPASSWORD or ~/.pgpass;
                                needs: pip install 'flowstate-engine[postgres]')
  http://host:8080              a store served by `flowstate serve` (token: $FLOWSTATE_TOKEN;
                                needs: pip install 'flowstate-engine[http]')
"""

EPILOG = f"""\
examples:
  {PROG} demo                                  run the demo, store in ./flowstate-demo.db
  {PROG} states {DEMO_URL} --label kind=order
  {PROG} states {DEMO_URL} --latest-only --json
  {PROG} get {DEMO_URL} r1-order-1
  {PROG} watch {DEMO_URL} --since-rev 10       (Ctrl-C to stop)
  {PROG} flows sqlite:///app.db --owner alice --status running
  {PROG} flow sqlite:///app.db FLOW-ID
  {PROG} recover sqlite:///app.db --flows myapp.flows:FLOWS
  {PROG} worker sqlite:///app.db --flows myapp.flows:FLOWS --concurrency 16
  {PROG} run flow.json sqlite:///app.db --tasks myapp.tasks:TASKS
  {PROG} serve sqlite:///app.db --port 8080       then: {PROG} states http://127.0.0.1:8080

Run '{PROG} COMMAND --help' for the options of one command.
"""


class CommandError(Exception):
    """A problem the user can fix; printed as one line with exit code 1."""


@frozen
class Command:
    """One subcommand: its help texts, how it adds its arguments, and what runs it.

    Attributes:
        name: The word typed after ``flowstate``.
        help: One line for the command list in ``flowstate --help``.
        description: The text at the top of ``flowstate NAME --help``.
        configure: Adds the command's arguments to its parser.
        run: Runs the command with the parsed arguments; returns the exit code.
    """

    name: str
    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Awaitable[int]]


# -- arguments ---------------------------------------------------------------------------------


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


class _Labels(argparse.Action):
    """Collects ``--label KEY=VALUE`` options into one mapping. A key given twice with two
    values is a usage error: a query asks for one value per label key, and silently keeping
    the last one would answer a question nobody asked."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        assert isinstance(values, tuple)
        key, value = values
        labels: dict[str, str] = dict(getattr(namespace, self.dest) or {})
        if labels.get(key, value) != value:
            parser.error(
                f"argument {option_string}: label {key!r} given twice, as {labels[key]!r} "
                f"and {value!r}; a label has one value"
            )
        labels[key] = value
        setattr(namespace, self.dest, labels)


_count = recover_service.count_option


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="the store, e.g. sqlite:///flowstate.db")


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--label",
        metavar="KEY=VALUE",
        type=_label,
        action=_Labels,
        default={},
        help="only versions with this label; repeat it to require several labels",
    )
    parser.add_argument(
        "--since-rev",
        metavar="N",
        type=_count(0, MAX_REV),
        default=0,
        help="only versions committed after revision N (default: 0, from the start)",
    )
    parser.add_argument(
        "--latest-only",
        action="store_true",
        help="only versions that are still their state's latest one",
    )


def _query(args: argparse.Namespace, limit: int = 50) -> fs.StatesQuery:
    return fs.StatesQuery(
        labels=dict(args.label),
        since_rev=args.since_rev,
        latest_only=args.latest_only,
        limit=limit,
    )


def _open_existing(url: str) -> Driver:
    """The driver of a store that must exist already: reading never creates a store."""
    driver = fs.open_driver(url)
    if (
        isinstance(driver, SQLiteDriver)
        and not driver.is_memory
        and not Path(driver.path).is_file()
    ):
        raise CommandError(f"no flowstate store at {driver.path!r} (from {url!r})")
    if driver.scheme == "postgresql":
        from flowstate.drivers.postgres import PostgresDriver  # loaded by open_driver already

        if isinstance(driver, PostgresDriver):
            driver.create = False  # open() fails on a missing schema instead of creating it
    elif driver.scheme == "etcd":
        from flowstate.drivers.etcd import EtcdDriver  # loaded by open_driver already

        if isinstance(driver, EtcdDriver):
            driver.create = False  # open() fails on a prefix without a store
    return driver


# -- output ------------------------------------------------------------------------------------


def _when(state: fs.State) -> str:
    return "-" if state.committed_at is None else _utc(state.committed_at)


def _utc(at: datetime.datetime) -> str:
    at = at.astimezone(datetime.UTC)
    return f"{at:%Y-%m-%d %H:%M:%S}.{at.microsecond // 1000:03d}Z"


def _status(state: fs.State) -> str:
    """The status to show: a version committed with a ``Delay`` shows as ``delayed``."""
    return "delayed" if state.is_delayed else state.status


def _next(state: fs.State) -> str:
    """The flow that runs next; for a delayed version, the delay's flow and when it is due."""
    due = state.delay_at
    if due is not None:
        return f"{state.delay_to} (due {_utc(due)})"
    return state.transition.to or "-"


def _pairs(mapping: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(mapping.items())) or "-"


# Control characters in a cell (a tab or a newline in an id or a label) would break its table:
# they are shown escaped, as Python writes them.
_ESCAPED = {c: repr(chr(c))[1:-1] for c in (*range(32), *range(127, 160))}


def _table(rows: Sequence[Sequence[str]]) -> str:
    rows = [[cell.translate(_ESCAPED) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _write_json(value: object) -> None:
    sys.stdout.write(_json.encode(value).decode() + "\n")
    sys.stdout.flush()


# -- states, get, watch ------------------------------------------------------------------------


def _configure_states(parser: argparse.ArgumentParser) -> None:
    _add_url(parser)
    _add_filters(parser)
    parser.add_argument(
        "--limit",
        metavar="N",
        type=_count(1, MAX_LIMIT),
        default=50,
        help="show at most N versions (default: 50)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"states": [...], "more": ..., "head_rev": ...} instead of a table',
    )


async def _run_states(args: argparse.Namespace) -> int:
    async with _open_existing(args.url) as driver:
        page = await driver.get_states(_query(args, args.limit))
    if args.json:
        _write_json(page)
        return 0
    if not page.states:
        print(f"no state versions match (store revision {page.head_rev})")
        return 0
    rows = [("REV", "ID", "STATUS", "NEXT", "COMMITTED (UTC)", "LABELS")]
    rows += [
        (
            str(state.rev),
            state.id,
            _status(state),
            _next(state),
            _when(state),
            _pairs(state.labels),
        )
        for state in page.states
    ]
    print(_table(rows))
    if page.more:
        print(f"... more: add --since-rev {page.states[-1].rev} for the next page")
    return 0


def _configure_get(parser: argparse.ArgumentParser) -> None:
    _add_url(parser)
    parser.add_argument("id", metavar="ID", help="the state's id")
    parser.add_argument(
        "--rev",
        metavar="N",
        type=_count(0, MAX_REV),
        default=0,
        help="the version at revision N (default: the latest version)",
    )
    parser.add_argument("--json", action="store_true", help="print the state as JSON")


async def _run_get(args: argparse.Namespace) -> int:
    if not args.id:
        raise CommandError("the state id must not be empty")
    async with _open_existing(args.url) as driver:
        state = await driver.get_state(args.id, args.rev)
    if args.json:
        _write_json(state)
        return 0
    next_flow = _next(state)
    rows = [
        ("id:", state.id),
        ("rev:", str(state.rev)),
        ("status:", _status(state)),
        ("next flow:", "- (ended)" if next_flow == "-" else next_flow),
        ("committed:", _when(state)),
        ("labels:", _pairs(state.labels)),
        ("annotations:", _pairs(state.annotations)),
        ("transition annotations:", _pairs(state.transition.annotations)),
    ]
    print(_table(rows))
    return 0


def _configure_watch(parser: argparse.ArgumentParser) -> None:
    _add_url(parser)
    _add_filters(parser)


async def _run_watch(args: argparse.Namespace) -> int:
    async with (
        _open_existing(args.url) as driver,
        fs.Engine(driver) as engine,
        engine.watch(_query(args, 100)) as watcher,
    ):
        async for state in watcher:
            _write_json(state)
    return 0


# -- managed flows -----------------------------------------------------------------------------


def _configure_flows(parser: argparse.ArgumentParser) -> None:
    _add_url(parser)
    parser.add_argument("--owner", help="only flows of this owner")
    parser.add_argument(
        "--status",
        choices=[status.value for status in FlowStatus],
        help="only flows whose latest version has this status",
    )
    parser.add_argument("--controller", help="only flows driven by this controller")
    parser.add_argument("--json", action="store_true", help="print a JSON list of flows")


async def _run_flows(args: argparse.Namespace) -> int:
    async with _open_existing(args.url) as driver, fs.Engine(driver) as engine:
        found = await FlowManager(engine).list(
            owner=args.owner, status=args.status, controller=args.controller
        )
    if args.json:
        _write_json(found)
        return 0
    if not found:
        print("no managed flows match")
        return 0
    rows = [("ID", "STATUS", "OWNER", "CONTROLLER", "RUNTIME", "STEP", "UPDATED (UTC)", "GOAL")]
    rows += [
        (
            flow.id,
            flow.status + (" (cancel requested)" if flow.cancel_requested else ""),
            flow.owner or "-",
            flow.controller,
            flow.runtime,
            flow.current_step or "-",
            _utc(flow.updated_at),
            flow.goal or "-",
        )
        for flow in found
    ]
    print(_table(rows))
    return 0


def _configure_flow(parser: argparse.ArgumentParser) -> None:
    _add_url(parser)
    parser.add_argument("id", metavar="ID", help="the managed flow's id")
    parser.add_argument(
        "--json", action="store_true", help='print {"flow": ..., "steps": [...], "events": [...]}'
    )


async def _run_flow(args: argparse.Namespace) -> int:
    if not args.id:
        raise CommandError("the flow id must not be empty")
    async with _open_existing(args.url) as driver, fs.Engine(driver) as engine:
        manager = FlowManager(engine)
        flow = await manager.get(args.id)
        steps = await manager.steps(args.id)
        events = await manager.events(args.id)
    if args.json:
        _write_json({"flow": flow, "steps": steps, "events": events})
        return 0
    status = flow.status + (" (cancel requested)" if flow.cancel_requested else "")
    print(
        _table(
            [
                ("id:", flow.id),
                ("status:", status),
                ("runtime:", flow.runtime + (f" ({flow.pipeline})" if flow.pipeline else "")),
                ("controller:", flow.controller),
                ("owner:", flow.owner or "-"),
                ("goal:", flow.goal or "-"),
                ("origin:", flow.origin or "-"),
                ("current step:", flow.current_step or "-"),
                ("waiting for:", "-" if flow.wait is None else _json.encode(flow.wait).decode()),
                ("state:", _json.encode(flow.state).decode()),
                ("created:", _utc(flow.created_at)),
                ("updated:", f"{_utc(flow.updated_at)} (rev {flow.revision})"),
            ]
        )
    )
    print(f"\nsteps ({len(steps)}):")
    if steps:
        rows = [("RUN", "TASK", "STATUS", "ATTEMPT", "UPDATED (UTC)", "RESULT / ERROR")]
        rows += [
            (
                step.run_id,
                step.task or "-",
                step.status,
                str(step.attempt),
                _utc(step.updated_at),
                step.error or ("-" if step.result is None else _json.encode(step.result).decode()),
            )
            for step in steps
        ]
        print(_table(rows))
    print(f"\nevents ({len(events)}):")
    lines = [("REV", "AT (UTC)", "EVENT", "STATUS", "PAYLOAD")]
    lines += [
        (
            str(event.revision),
            _utc(event.at),
            event.kind,
            str(event.status),
            _json.encode(event.payload).decode() if event.payload else "-",
        )
        for event in events
    ]
    print(_table(lines))
    return 0


# -- demo --------------------------------------------------------------------------------------

APPROVAL_LIMIT = 100  # orders of this amount (EUR) or more wait for a manager's approval
MAX_CHARGE_ATTEMPTS = 3
APPROVAL_DELAY = 0.3  # seconds the manager takes to look at an order
RETRY_AFTER = 1.0  # seconds a running order may stall before the demo's recoverer retries it
DEMO_TIMEOUT = 60.0  # seconds; the demo takes a few, so anything longer is a fault
# Set only in the demo's worker process: the id of the order it crashes on while shipping.
CRASH_ENV = "FLOWSTATE_DEMO_CRASH_ON"


def _note(ctx: fs.StateCtx, text: str) -> None:
    ctx.current.annotations["note"] = text


async def _validate(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    amount = int(ctx.current.annotations["amount"])
    if amount >= APPROVAL_LIMIT:
        _note(ctx, f"{amount} EUR: needs a manager's approval")
        return fs.Commit(fs.Transit(ctx, "await_approval"))
    _note(ctx, f"{amount} EUR: no approval needed")
    return fs.Commit(fs.Transit(ctx, "charge"))


async def _await_approval(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    # Pause rests the state (the recoverer leaves it alone); Resume continues at "charge".
    _note(ctx, "waiting for a manager")
    return fs.Commit(fs.Pause(ctx, "charge"))


async def _charge(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    annotations = ctx.current.annotations
    attempt = int(annotations.get("charge_attempts", "0")) + 1
    annotations["charge_attempts"] = str(attempt)
    declined = annotations.get("card") == "flaky" and attempt == 1
    if declined and attempt < MAX_CHARGE_ATTEMPTS:
        _note(ctx, f"card declined on attempt {attempt}: retrying")
        return fs.Commit(fs.Transit(ctx, "charge"))
    if declined:
        _note(ctx, f"card declined {attempt} times: order cancelled")
        return fs.Commit(fs.End(ctx))
    _note(ctx, f"paid on attempt {attempt}")
    return fs.Commit(fs.Transit(ctx, "ship"))


async def _ship(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    if os.environ.get(CRASH_ENV) == ctx.id:
        # The demo's worker process dies here on purpose, mid-flow, as a real crash would.
        os.kill(os.getpid(), signal.SIGKILL)
    _note(ctx, "shipped")
    return fs.Commit(fs.End(ctx))


DEMO_FLOWS: dict[str, fs.Flow] = {
    "validate": _validate,
    "await_approval": _await_approval,
    "charge": _charge,
    "ship": _ship,
}


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=DEMO_URL,
        help=(
            f"the store to run the demo on (default: {DEMO_URL}); on a store only this "
            "process can reach (memory://, sqlite://:memory:) the crash is left out"
        ),
    )
    # The demo starts itself as a worker process that crashes; not for people to call.
    parser.add_argument("--worker", nargs=2, metavar=("ORDER", "RUN"), help=argparse.SUPPRESS)


async def _run_worker(url: str, order_id: str, run: str) -> int:
    """The demo's worker process: takes one order and crashes while shipping it."""
    async with fs.Engine(url, flows=DEMO_FLOWS) as engine:
        labels = {"kind": "order", "demo-run": run}
        ctx = fs.StateCtx.new(order_id, labels=labels, annotations={"amount": "40", "card": "ok"})
        await engine.do(fs.Commit(fs.Transit(ctx, "validate")))
        await engine.execute(ctx)
    return 0


async def _crashing_worker(url: str, order_id: str, run: int) -> str:
    """Run the worker process to its crash; say how it ended."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "flowstate",
        "demo",
        "--url",
        url,
        "--worker",
        order_id,
        str(run),
        env={**os.environ, CRASH_ENV: order_id},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
    )
    code = await proc.wait()
    how = "killed by SIGKILL" if code == -signal.SIGKILL else f"exit code {code}"
    return f"worker process {proc.pid} crashed ({how}) while shipping {order_id}"


def _in_this_process_only(driver: Driver) -> bool:
    """True for a store no other process can open (its data lives in this process)."""
    return isinstance(driver, MemoryDriver) or (
        isinstance(driver, SQLiteDriver) and driver.is_memory
    )


async def _next_run(engine: fs.Engine) -> int:
    """Count demo runs in the store itself, so that each run's order ids are new."""
    try:
        counter = await engine.get_state("demo-runs")
    except fs.NotFoundError:
        counter = fs.StateCtx.new("demo-runs")
    run = int(counter.current.annotations.get("count", "0")) + 1
    counter.current.annotations["count"] = str(run)
    await engine.do(fs.Commit(fs.Noop(counter)))
    return run


async def _follow(
    engine: fs.Engine,
    query: fs.StatesQuery,
    orders: set[str],
    on_state: Callable[[fs.State], Awaitable[None]],
) -> None:
    """Pass every version of the run's orders to ``on_state`` until all of them ended."""
    ended: set[str] = set()
    async with engine.watch(query) as watcher:
        async for state in watcher:
            await on_state(state)
            if state.is_ended:
                ended.add(state.id)
                if ended == orders:
                    return


class _Output:
    """The demo's stdout. When the reader goes away (``flowstate demo | head -3``), the demo
    goes on silently to the end, so that it leaves no order running in the store."""

    def __init__(self) -> None:
        self.reader_gone = False

    def say(self, text: str = "", end: str = "\n") -> None:
        if self.reader_gone:
            return
        try:
            print(text, end=end, flush=True)
        except BrokenPipeError:
            self.reader_gone = True
            _reader_gone()


async def _run_demo(args: argparse.Namespace) -> int:
    if args.worker:
        return await _run_worker(args.url, *args.worker)
    started = time.monotonic()
    out = _Output()
    async with fs.open_driver(args.url) as driver, fs.Engine(driver, flows=DEMO_FLOWS) as engine:
        run = await _next_run(engine)
        labels = {"kind": "order", "demo-run": str(run)}
        since = await engine.driver.head_rev()
        query = fs.StatesQuery(labels=labels, since_rev=since)
        orders = {
            f"r{run}-order-1": {"amount": "25", "card": "ok"},
            f"r{run}-order-2": {"amount": "250", "card": "ok"},
            f"r{run}-order-3": {"amount": "60", "card": "flaky"},
        }
        # A worker process takes this one and crashes mid-flow; the recoverer finishes it.
        # Another process cannot reach a store that lives in this one, so it is left out there.
        crash_order = f"r{run}-order-4"
        shared = not _in_this_process_only(driver)
        out.say(f"flowstate demo, run {run}, on {hide_password(args.url)}")
        out.say("Three orders: a small one, a large one a manager must approve, and one whose")
        out.say("card is declined once.", end=" ")
        if shared:
            out.say("A fourth is taken by a worker process that crashes while")
            out.say(
                f"shipping it; the recoverer retries it once it stalled for {RETRY_AFTER:.0f} s."
            )
        else:
            out.say("(The fourth, taken by a worker process that crashes, needs a store")
            out.say(f"another process can reach, such as the default {DEMO_URL}.)")
        out.say("Every committed version, as a watcher sees it:\n")
        out.say(f"{'REV':>5}  {'ORDER':<14} {'STATUS':<8} {'NEXT':<15} NOTE")

        async def show(state: fs.State) -> None:
            next_flow = state.transition.to or "-"
            note = state.annotations.get("note", "new order")
            if fs.recovery.attempt(state):
                note = f"{note}; retried by the recoverer (attempt {fs.recovery.attempt(state)})"
            out.say(f"{state.rev:>5}  {state.id:<14} {state.status:<8} {next_flow:<15} {note}")

        async def approve(state: fs.State) -> None:
            # The manager: resumes each paused order a moment later, then runs it on.
            if not state.is_paused:
                return
            await asyncio.sleep(APPROVAL_DELAY)
            ctx = await engine.get_state(state.id)
            if not ctx.current.is_paused:
                return
            _note(ctx, "approved by the manager")
            await engine.do(fs.Commit(fs.Resume(ctx)))
            await engine.execute(ctx)

        all_orders = {*orders, crash_order} if shared else set(orders)
        crash_report: list[str] = []

        async def crash() -> None:
            crash_report.append(await _crashing_worker(args.url, crash_order, run))

        recoverer = fs.Recoverer(engine, retry_after=RETRY_AFTER, lease_ttl=2.0, tick=0.1)
        try:
            async with recoverer, asyncio.timeout(DEMO_TIMEOUT), asyncio.TaskGroup() as group:
                group.create_task(_follow(engine, query, all_orders, show))
                group.create_task(_follow(engine, query, all_orders, approve))
                for order_id, annotations in orders.items():
                    ctx = fs.StateCtx.new(order_id, labels=labels, annotations=annotations)
                    await engine.do(fs.Commit(fs.Transit(ctx, "validate")))
                    group.create_task(engine.execute(ctx))
                if shared:
                    group.create_task(crash())
        except TimeoutError:
            raise CommandError(
                f"the demo's orders did not all finish within {DEMO_TIMEOUT:.0f} s"
            ) from None
    elapsed = time.monotonic() - started
    out.say()
    for line in crash_report:
        out.say(f"{line}; the recoverer retried it and it finished.")
    out.say(f"All {len(all_orders)} orders finished in {elapsed:.1f} s.", end="")
    if shared:
        out.say(" Look at them again with:")
        out.say(f"  {PROG} states {hide_password(args.url)} --label demo-run={run} --latest-only")
    else:
        out.say(" They were kept in this process's memory only, and are gone now.")
    return 0


# -- the command table -------------------------------------------------------------------------


# Every subcommand, in the order `flowstate --help` lists them. A new subcommand (such as a
# `recover` service runner) is one more entry here, with its configure and run functions.
async def _run_recover(args: argparse.Namespace) -> int:
    try:
        return await recover_service.run(args, extra_flows=workflow_flows())
    except recover_service.FlowsSpecError as exc:
        raise CommandError(str(exc)) from exc


async def _run_serve(args: argparse.Namespace) -> int:
    try:
        return await serve_command.run(args)
    except (serve_command.ServeError, recover_service.FlowsSpecError) as exc:
        raise CommandError(str(exc)) from exc


# -- worker and run ------------------------------------------------------------------------------

_CODE_WARNING = (
    "imported from the current folder or the Python path; this imports and runs that code, "
    "with access to the store: point it only at code you trust"
)


def _configure_worker(parser: argparse.ArgumentParser) -> None:
    _add_url(parser)
    parser.add_argument(
        "--flows",
        type=recover_service.spec_option,
        metavar="MODULE:ATTR",
        help="the flows and pipelines to run: a mapping of flow ids to flows (add "
        f"flowstate.workflows.workflow_flows(*pipelines) to it for pipelines), {_CODE_WARNING}",
    )
    parser.add_argument(
        "--tasks",
        type=recover_service.spec_option,
        metavar="MODULE:ATTR",
        help="step functions by task name, for runs of JSON pipeline definitions, " + _CODE_WARNING,
    )
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=_count(1),
        default=8,
        help="run at most N executions at once (default 8)",
    )
    parser.add_argument(
        "--drain-timeout",
        metavar="S",
        type=recover_service.seconds_option(positive=False),
        default=30.0,
        help="on SIGTERM, wait up to S seconds for running steps to end (default 30)",
    )


def _load_tasks(spec: str) -> dict[str, StepFn]:
    try:
        return recover_service.load_tasks(spec)
    except recover_service.FlowsSpecError as exc:
        raise CommandError(str(exc)) from exc


async def _run_worker_service(args: argparse.Namespace) -> int:
    recover_service.import_from_working_directory()
    try:
        flows = recover_service.load_flows(args.flows) if args.flows else fs.FlowRegistry()
    except recover_service.FlowsSpecError as exc:
        raise CommandError(str(exc)) from exc
    tasks = _load_tasks(args.tasks) if args.tasks else {}
    if not flows and not tasks:
        raise CommandError("give the worker something to run: --flows and/or --tasks")
    for flow_id, fn in workflow_flows().items():
        flows.register(flow_id, fn)

    async def service(stop: asyncio.Event) -> None:
        async with (
            fs.Engine(args.url, flows=flows) as engine,
            Worker(
                engine,
                concurrency=args.concurrency,
                tasks=tasks,
                drain_timeout=args.drain_timeout,
            ),
        ):
            await stop.wait()

    return await recover_service.until_signalled(service)


def _configure_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("definition", metavar="DEFINITION.json", help="a JSON pipeline definition")
    _add_url(parser)
    parser.add_argument(
        "--tasks",
        type=recover_service.spec_option,
        metavar="MODULE:ATTR",
        required=True,
        help="step functions by task name, " + _CODE_WARNING,
    )
    parser.add_argument("--input", metavar="JSON", default="null", help="the run's input")
    parser.add_argument("--owner", default="", help="whom the run belongs to")


#: Seconds ``flowstate run`` rides out an unreachable store before it gives up (exit 1).
RUN_OUTAGE = 30.0


async def _run_run(args: argparse.Namespace) -> int:
    recover_service.import_from_working_directory()
    tasks = _load_tasks(args.tasks)
    try:
        definition = await asyncio.to_thread(Path(args.definition).read_bytes)
    except OSError as exc:
        raise CommandError(f"cannot read {args.definition}: {exc.strerror}") from exc
    try:
        run_input = msgspec.json.decode(args.input)
    except msgspec.DecodeError as exc:
        raise CommandError(f"--input is not JSON: {exc}") from exc
    pipeline = Pipeline.from_definition(definition, tasks=tasks)
    _quiet_logs()
    out = _Output()
    async with fs.Engine(args.url) as engine:
        manager = FlowManager(engine)
        manager.register(pipeline)
        since = await engine.driver.head_rev()
        run = await manager.execute(pipeline.id, input=run_input, owner=args.owner, enqueue=True)
        out.say(f"run {run.id} of {pipeline.id!r} started")
        async with asyncio.TaskGroup() as group:
            executing = group.create_task(_execute_run(engine, run.id))
            status = await _follow_run(engine, run.id, since, out)
            # Ended: by this process's last commit, or by a cancel from elsewhere, which
            # leaves a step running here that no run waits for any more.
            executing.cancel()
        return 0 if status == "finished" else EXIT_ERROR


def _quiet_logs() -> None:
    """Keep flowstate's log records off stderr, where Python prints warnings and errors
    (with their tracebacks) when nobody configured logging: ``run`` prints the run's events
    on stdout and, when it cannot go on, one line on stderr."""
    if not logging.getLogger().handlers:
        logging.getLogger("flowstate").addHandler(logging.NullHandler())


async def _execute_run(engine: fs.Engine, run_id: str) -> None:
    """Run the run in this task, not in the engine's background, where a failure would only
    be logged and ``run`` would wait for the run's end forever.

    When this process cannot go on (the store is unreachable when a step's end must be
    committed), the run stays running in the store, where the recoverer (or a worker with
    the run's tasks) takes it over.
    """
    left = f"run {run_id} stays running in the store, for a recoverer or a worker to take over"
    try:
        await engine.execute(await engine.get_state(run_id))
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # cancelled from outside: Ctrl-C, or the run's follower failed
        raise CommandError(f"the run's executor raised CancelledError; {left}") from None
    except fs.DriverError as exc:
        raise CommandError(f"cannot reach the store to go on: {exc}; {left}") from exc


async def _follow_run(engine: fs.Engine, run_id: str, since: int, out: _Output) -> str:
    """Print the run's events as they are committed; return its terminal status."""
    try:
        async with engine.watch(
            id=run_id, since_rev=since, unavailable_timeout=RUN_OUTAGE
        ) as versions:
            async for version in versions:
                if not is_flow(version):
                    continue
                for event in events_of(version):
                    out.say(_describe(event))
                status = flow_of(version).status
                if status.is_terminal:
                    return str(status)
    except fs.DriverUnavailableError as exc:
        raise CommandError(
            f"the store was unreachable for {RUN_OUTAGE:g} s: {exc}; run {run_id} may still "
            "be running there"
        ) from exc
    raise CommandError(f"the engine closed before run {run_id} ended")


def _describe(event: FlowEvent) -> str:
    """One line for an event: a step's events name the step and the attempt, the run's
    end its reason (``failed``) or how it was stopped (``cancelled``)."""
    payload = event.payload
    step = ""
    if "attempt" in payload:
        step = f" {payload.get('step')} (attempt {payload['attempt']})"
    detail = ""
    if "output" in payload:
        detail = f": {_json.encode(payload['output']).decode()}"
    elif "error" in payload:
        detail = f": {payload['error']}"
    elif "reason" in payload:
        detail = f": {payload['reason']}"
    elif "how" in payload:
        detail = f" ({payload['how']})"
    return f"{_utc(event.at)}  {event.kind}{step}{detail}"


COMMANDS: tuple[Command, ...] = (
    Command(
        name="demo",
        help="run a small order-processing workflow and print its states as they change",
        description=(
            "Run four orders through a small workflow (validate, wait for a manager's "
            "approval, charge with a retry, ship) and print every state version as a watcher "
            "sees it. The fourth order is taken by a worker process that crashes while "
            "shipping it; the recoverer retries it and it finishes. Takes a few seconds."
        ),
        configure=_configure_demo,
        run=_run_demo,
    ),
    Command(
        name="states",
        help="list state versions in a store, oldest first",
        description=(
            "List the state versions of a store that match the filters, in revision order, "
            "as a table (or JSON with --json)."
        ),
        configure=_configure_states,
        run=_run_states,
    ),
    Command(
        name="get",
        help="show one state: its latest version, or the one at --rev",
        description="Show one state: its latest version, or its version at --rev.",
        configure=_configure_get,
        run=_run_get,
    ),
    Command(
        name="flows",
        help="list managed flows at their latest versions",
        description=(
            "List the managed flows of a store (see flowstate.workflows.FlowManager) at their "
            "latest versions, filtered by owner, status and controller."
        ),
        configure=_configure_flows,
        run=_run_flows,
    ),
    Command(
        name="flow",
        help="show one managed flow with its steps and its audit trail",
        description="Show one managed flow: its fields, its steps and every event it recorded.",
        configure=_configure_flow,
        run=_run_flow,
    ),
    Command(
        name="recover",
        help="run the recoverer and the delayer on a store until SIGTERM (one replica leads)",
        description=(
            "Retry states that stall, force-end them once their attempts are spent, and fire "
            "delayed states when due. Run as many replicas as you like against one store: one "
            "leads (it logs so), the others stand by and take over within --lease-ttl seconds "
            "when it dies, or at once when it stops cleanly on SIGTERM or Ctrl-C."
        ),
        configure=recover_service.configure,
        run=_run_recover,
    ),
    Command(
        name="worker",
        help="run pipeline runs and flows that other processes start, until SIGTERM",
        description=(
            "Follow a store and run the pipeline runs and plain flows other processes commit, "
            "at most --concurrency at a time. Run as many workers as you like: they share the "
            "work, and no step runs twice while its worker lives. On SIGTERM a worker stops "
            "taking work, finishes its running steps (up to --drain-timeout) and hands the "
            "rest back."
        ),
        configure=_configure_worker,
        run=_run_worker_service,
    ),
    Command(
        name="run",
        help="start one run of a JSON pipeline definition and follow it to its end",
        description=(
            "Start a run of a JSON pipeline definition (the flow-manager format) with the step "
            "functions of --tasks, run it here, and print each step as it starts and ends. "
            "Exits 0 when the run finishes, 1 when it fails or is cancelled."
        ),
        configure=_configure_run,
        run=_run_run,
    ),
    Command(
        name="serve",
        help="serve a store over HTTP: states, a watch stream, and the remote driver's routes",
        description=(
            "Run the HTTP API of a store until SIGTERM: read states and their history, watch "
            "versions as Server-Sent Events, and let engines elsewhere use the store through "
            "http:// URLs. Without a token (--token-file or $FLOWSTATE_TOKEN) it listens on "
            "loopback only. The start line names the address (--port 0 picks a free port)."
        ),
        configure=serve_command.configure,
        run=_run_serve,
    ),
    Command(
        name="watch",
        help="print state versions as JSON lines as they are committed, until Ctrl-C",
        description=(
            "Print every matching state version as one JSON line: first the ones already "
            "stored after --since-rev, then each new one as it is committed. Stop with Ctrl-C."
        ),
        configure=_configure_watch,
        run=_run_watch,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``flowstate`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {fs.__version__}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name, help=command.help, description=command.description
        )
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def _error(message: object) -> int:
    text = " ".join(str(message).split()) or "unknown error"
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run the ``flowstate`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 1 on an error (printed on one line to stderr, never as a
        traceback, whatever the error), 2 on a bad command line, 130 when interrupted with
        Ctrl-C.
    """
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help()
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[argparse.Namespace], Awaitable[int]] = args.run
    try:
        return asyncio.run(_main(run, args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (fs.FlowstateError, CommandError) as exc:
        return _error(exc)
    except ImportError as exc:  # a driver module that cannot be imported
        url = hide_password(getattr(args, "url", "?"))
        return _error(f"cannot load the driver for {url!r}: {exc}")
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is not None:
            return EXIT_INTERRUPTED
        if group.subgroup(BrokenPipeError) is not None:
            return _reader_gone()
        known = _first_error(group)
        return _error(known) if known is not None else _unexpected(_first_leaf(group))
    except BrokenPipeError:
        return _reader_gone()
    except Exception as exc:  # noqa: BLE001 (a bug, or a failure nobody translated: one line)
        return _unexpected(exc)


def _unexpected(exc: BaseException) -> int:
    return _error(f"unexpected {type(exc).__name__}: {exc}")


def _reader_gone() -> int:
    """The reader went away (e.g. `flowstate demo | head`): stop quietly, and keep Python
    from complaining about the broken pipe again when it flushes at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


async def _main(
    run: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    return await run(args)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in a task group's failure that is not itself a group."""
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first flowstate error in a task group's failure, if it holds one."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_error(exc)
            if found is not None:
                return found
        elif isinstance(exc, fs.FlowstateError | CommandError):
            return exc
    return None
