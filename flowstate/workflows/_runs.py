"""Pipeline runs: the flow that walks a run through its pipeline, one committed step at a time.

A run is a managed flow of runtime ``pipeline``. Its record's ``run`` holds the progress: the
current ``step``, its ``attempt`` and the ``phase`` (``pending``: nothing started yet;
``started``: that attempt is running; ``backoff``: it failed and the next attempt is due at
``retry_at``), ``claims``, how many attempts were claimed in the run so far (the latest
claim's number, which names the attempt running), and ``lost``, how many of the step's attempts
stopped without an outcome (their process stopped), when any did. The flowstate state is *running* at the pipeline's flow id the
whole time, so the recoverer retries a run whose executor died.

Claiming is a compare-and-set: an executor starts an attempt only by committing
``step_started`` against the version it read, so of two executors (a worker and the
recoverer, two workers) exactly one runs each attempt. An attempt that ends commits its
output and, in the same commit, the start of the next step (or the run's end), so a step
whose end was committed never runs again, and a run moves on in one commit per step.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any, Final

import attrs

import flowstate as fs
from flowstate.workflows._changes import Change, cancelled, failed, preceded
from flowstate.workflows._model import (
    RUNTIME,
    STATUS,
    FlowStatus,
    FlowStep,
    ManagedFlow,
    Record,
    StepStatus,
    events_of,
    is_flow,
    iso,
    json_bytes,
    read_record,
)
from flowstate.workflows._pipeline import END, Pipeline, StepContext

if TYPE_CHECKING:
    from collections.abc import Iterable

    from flowstate.workflows._manager import FlowManager

__all__ = [
    "BACKOFF",
    "PENDING",
    "STARTED",
    "PipelineExecutor",
    "claimable",
    "new_progress",
    "run_steps",
]

logger = logging.getLogger("flowstate.workflows")

PENDING: Final = "pending"
STARTED: Final = "started"
BACKOFF: Final = "backoff"
#: The data alias under which a run keeps the JSON definition of its pipeline, if it has one.
DEFINITION: Final = "pipeline"


#: Seconds a step runs (give or take as much again) before its process follows the store's
#: cancels for it (a watcher of cancelled runs per engine, while such steps run): a cancel
#: through another process stops a longer step; a shorter one ends first, and the cancel
#: discards its end.
FOLLOW_CANCELS_AFTER: Final = 0.2

#: How many attempts of one step may stop without an outcome (their process stopped) before
#: the step counts as failed. Such attempts do not use up the step's ``retries``: those are
#: for the step's own errors.
LOST_ATTEMPTS: Final = 100


def new_progress(pipeline: Pipeline) -> dict[str, Any]:
    """The progress a new run of ``pipeline`` starts with."""
    return {"step": pipeline.start, "attempt": 0, "phase": PENDING}


def _claims(run: dict[str, Any] | None) -> int:
    """How many attempts were claimed in the run whose progress is ``run``: the number of
    the latest claim, which tells its attempt from any other, in a pipeline that loops back
    to a step too."""
    return 0 if run is None else int(run.get("claims", 0))


def _progress(
    record: Record, step: str | None, attempt: int, phase: str, **more: Any
) -> dict[str, Any]:
    """A run's progress, its count of claims carried over from ``record``'s unless ``more``
    says otherwise."""
    return {"step": step, "attempt": attempt, "phase": phase, "claims": _claims(record.run), **more}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@attrs.define
class _Decision:
    """What the executor does after a plan: run an attempt, wait, or stop."""

    action: str = "stop"  # "run" | "wait" | "stop"
    step: str = ""
    attempt: int = 0
    claim: int = 0
    until: float = 0.0


@attrs.frozen
class _Outcome:
    """How an attempt ended: ``success`` or ``failure`` with an output, or ``error``."""

    kind: str
    output: Any = None
    error: str = ""
    seconds: float = 0.0


class PipelineExecutor:
    """The flow registered under a pipeline's :attr:`~Pipeline.flow_id`: it runs the runs.

    Called with a run's ctx (by ``engine.execute``, a worker or the recoverer), it reads the
    run, claims its next attempt with a compare-and-set, runs the step, commits the outcome,
    and goes on until the run ends or another executor owns it. It keeps the tasks of the
    attempts it runs, so that cancelling a run in this process cancels its running step.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self._managers: weakref.WeakKeyDictionary[fs.Engine, FlowManager] = (
            weakref.WeakKeyDictionary()
        )
        # The task running each run's attempt (or backoff wait) in this process.
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._cancelled: set[str] = set()
        self._hand_back: set[str] = set()
        self._waits: set[str] = set()
        # Per engine: the attempts running on it (each from its claim to its end's commit),
        # and what follows cancels for them.
        self._engines: weakref.WeakKeyDictionary[fs.Engine, _Attempts] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"PipelineExecutor({self.pipeline.id!r})"

    async def __call__(self, ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        manager = self._managers.get(engine)
        if manager is None:
            # The manager module imports this one: import it when a run first needs it.
            from flowstate.workflows._manager import FlowManager

            manager = self._managers[engine] = FlowManager(engine)
        try:
            await self.run(manager, ctx.id)
        except fs.ConflictError:
            # Other writers kept moving the run: whoever moved it goes on with it, and the
            # recoverer retries it if nobody does.
            logger.debug("run %r: lost the run to other writers", ctx.id)
        return fs.Noop()

    @property
    def running(self) -> frozenset[str]:
        """The runs whose attempt (or backoff wait) runs in this process now."""
        return frozenset(self._tasks)

    def stop_after_step(self, run_id: str) -> None:
        """Hand ``run_id`` back at its next step boundary: commit the end of the running
        attempt without starting the next one (or stop waiting for a retry), and return."""
        self._hand_back.add(run_id)
        if run_id in self._waits:
            self.cancel_local(run_id)  # a backoff wait: nothing to finish

    def cancel_local(self, run_id: str) -> bool:
        """Cancel the attempt (or backoff wait) of ``run_id`` running in this process.

        Returns:
            True when there was one.
        """
        task = self._tasks.get(run_id)
        if task is None:
            return False
        if run_id not in self._cancelled:  # cancelled once, however many ask
            self._cancelled.add(run_id)
            task.cancel()
        return True

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, manager: FlowManager, run_id: str) -> None:
        """Run ``run_id`` until it ends or another executor owns it."""
        decision = _Decision()
        attempts = self._engines.get(manager.engine)
        if attempts is None:
            attempts = self._engines[manager.engine] = _Attempts(self, manager.engine)

        def plan_next(state: fs.State, flow: ManagedFlow, record: Record) -> Change | None:
            decision.action = "stop"
            return self._plan_next(state, flow, record, decision)

        try:
            flow = await manager._mutate(run_id, plan_next)
            while decision.action != "stop":
                if decision.action == "wait":
                    await self._wait(run_id, decision.until)
                    if run_id in self._hand_back:
                        return
                    flow = await manager._mutate(run_id, plan_next)
                else:
                    flow = await self._step(manager, flow, decision, attempts)
        finally:
            self._hand_back.discard(run_id)

    async def _step(
        self, manager: FlowManager, flow: ManagedFlow, decision: _Decision, attempts: _Attempts
    ) -> ManagedFlow:
        """Run the attempt ``decision`` claimed on ``flow`` and commit its outcome (with what
        the run does next); return the run as committed."""
        step_id, attempt, claim = decision.step, decision.attempt, decision.claim
        attempts.began(flow.id, flow.revision, claim)
        try:
            outcome = await self._attempt(flow, step_id, attempt)
            if outcome is None:
                decision.action = "stop"  # cancelled while it ran: the cancel ended the run
                return flow

            def plan_done(state: fs.State, flow: ManagedFlow, record: Record) -> Change | None:
                decision.action = "stop"
                return self._plan_done(flow, record, claim, outcome, decision)

            return await manager._mutate(flow.id, plan_done)
        finally:
            attempts.ended(flow.id)

    async def _wait(self, run_id: str, until: float) -> None:
        """Sleep until a retry is due; a cancel in this process ends the sleep early."""
        self._hold(run_id)
        self._waits.add(run_id)
        try:
            await asyncio.sleep(max(0.0, until - time.time()))
        except asyncio.CancelledError:
            if not self._cancelled_here(run_id):
                raise
        finally:
            self._waits.discard(run_id)
            self._release(run_id)

    async def _attempt(self, flow: ManagedFlow, step_id: str, attempt: int) -> _Outcome | None:
        """Run one attempt; None when a cancel in this process stopped it."""
        step = self.pipeline.step(step_id)
        state = flow.state
        context = StepContext(
            run_id=flow.id,
            step_id=step_id,
            attempt=attempt,
            input=state.get("input"),
            outputs=dict(state.get("outputs", {})),
            state=state,
        )
        started = time.perf_counter()
        self._hold(flow.id)
        timer = None if step.timeout is None else asyncio.timeout(step.timeout)
        try:
            if timer is None:
                output = await step.fn(context)
            else:
                async with timer:
                    output = await step.fn(context)
        except TimeoutError as exc:
            seconds = time.perf_counter() - started
            if timer is not None and timer.expired():
                error = f"timed out after {step.timeout}s"
            else:
                error = _describe(exc)  # the step's own TimeoutError, as any other error
            return _Outcome("error", error=error, seconds=seconds)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and not task.cancelling() and flow.id not in self._cancelled:
                # Nothing cancelled this task: the step raised CancelledError itself.
                seconds = time.perf_counter() - started
                return _Outcome("error", error="CancelledError raised by the step", seconds=seconds)
            if not self._cancelled_here(flow.id):
                raise
            return None
        except Exception as exc:  # noqa: BLE001 (any error of a step is its outcome)
            seconds = time.perf_counter() - started
            return _Outcome("error", error=_describe(exc), seconds=seconds)
        finally:
            self._release(flow.id)
        seconds = time.perf_counter() - started
        try:
            json_bytes(output, f"the output of step {step_id!r}")
        except fs.InvalidCommandError as exc:
            return _Outcome("error", error=str(exc), seconds=seconds)
        if isinstance(output, dict) and output.get("status") == "failure":
            return _Outcome("failure", output=output, seconds=seconds)
        return _Outcome("success", output=output, seconds=seconds)

    def _hold(self, run_id: str) -> None:
        """Note that this task now runs ``run_id``'s attempt (or waits to retry it)."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks[run_id] = task

    def _release(self, run_id: str) -> None:
        self._tasks.pop(run_id, None)
        self._cancelled.discard(run_id)

    def _cancelled_here(self, run_id: str) -> bool:
        """True when the cancellation came from :meth:`cancel_local` alone (then it is
        taken back, and the executor goes on); False when something else cancels the task
        too, such as the engine closing."""
        if run_id not in self._cancelled:
            return False
        task = asyncio.current_task()
        return task is not None and task.uncancel() == 0

    # -- plans ---------------------------------------------------------------------------------

    def _plan_next(
        self, state: fs.State, flow: ManagedFlow, record: Record, decision: _Decision
    ) -> Change | None:
        """Claim the run's next attempt, or say why not."""
        run = record.run
        if flow.status.is_terminal or run is None or flow.id in self._hand_back:
            return None  # over, or handed back (a stopping worker) before its first claim
        phase, step_id, attempt = run["phase"], run["step"], run["attempt"]
        lost = run.get("lost", 0)
        extra: list[tuple[str, dict[str, Any]]] = []
        if phase == STARTED:
            if fs.recovery.attempt(state) == 0 or any(
                engine_attempts.runs(flow.id, _claims(run))
                for engine_attempts in self._engines.values()
            ):
                # A live executor runs it: the recoverer says when it is not, but a step
                # that outlasts its retry_after still runs here, and will commit its end.
                return None
            # Its executor stopped mid-attempt: that attempt failed, and the step runs again.
            lost += 1
            error = f"attempt {attempt} stopped without an outcome (its process stopped)"
            extra.append(("step_failed", {"step": step_id, "attempt": attempt, "error": error}))
            if lost >= LOST_ATTEMPTS:
                reason = (
                    f"step {step_id!r} failed: its process stopped during {lost} of its "
                    f"{attempt} attempts"
                )
                return self._branch(flow, record, step_id, "failure", reason, extra, decision)
        if record.cancel_requested:
            return preceded(cancelled(flow, record, how="requested"), extra)
        if phase == BACKOFF:
            due = datetime.datetime.fromisoformat(run["retry_at"]).timestamp()
            if due > time.time():
                decision.action, decision.until = "wait", due
                return None
        return self._claim(flow, record, step_id, attempt + 1, extra, decision, lost=lost)

    def _plan_done(
        self,
        flow: ManagedFlow,
        record: Record,
        claim: int,
        outcome: _Outcome,
        decision: _Decision,
    ) -> Change | None:
        """Commit how the attempt the run's claim number ``claim`` started ended and, in the
        same commit, what the run does next."""
        run = record.run
        if (
            flow.status.is_terminal
            or run is None
            or run["phase"] != STARTED
            or _claims(run) != claim
        ):
            # Cancelled, or another executor took the attempt over (and may have gone on
            # since, even back to this very step and attempt number, in a pipeline that loops).
            return None
        step_id, attempt = run["step"], run["attempt"]
        payload: dict[str, Any] = {
            "step": step_id,
            "attempt": attempt,
            "duration_ms": round(outcome.seconds * 1000, 3),
        }
        if outcome.kind == "success":
            record.state.setdefault("outputs", {})[step_id] = outcome.output
            payload["output"] = outcome.output
            first = ("step_completed", payload)
            return self._branch(flow, record, step_id, "success", "", [first], decision)
        if outcome.kind == "failure":
            record.state.setdefault("outputs", {})[step_id] = outcome.output
            payload["output"] = outcome.output
            reason = f"step {step_id!r} returned a failure: {outcome.output}"
            first = ("step_failed", payload)
            return self._branch(flow, record, step_id, "failure", reason, [first], decision)
        payload["error"] = outcome.error
        step = self.pipeline.step(step_id)
        if record.cancel_requested:
            # Asked to stop: no retry.
            return preceded(cancelled(flow, record, how="requested"), [("step_failed", payload)])
        lost = run.get("lost", 0)
        if attempt - lost <= step.retries:
            delay = step.delay(attempt - lost)
            due = _now() + datetime.timedelta(seconds=delay)
            payload["retry_in"] = delay
            payload["retry_at"] = retry_at = iso(due)
            record.run = _progress(record, step_id, attempt, BACKOFF, retry_at=retry_at)
            if lost:
                record.run["lost"] = lost
            decision.action, decision.until = "wait", due.timestamp()
            return Change(
                status=flow.status,
                record=record,
                event="step_failed",
                payload=payload,
                flow=self.pipeline.flow_id,
            )
        reason = f"step {step_id!r} failed after {attempt} attempts: {outcome.error}"
        first = ("step_failed", payload)
        return self._branch(flow, record, step_id, "failure", reason, [first], decision)

    def _branch(
        self,
        flow: ManagedFlow,
        record: Record,
        step_id: str,
        outcome: str,
        reason: str,
        events: list[tuple[str, dict[str, Any]]],
        decision: _Decision,
    ) -> Change:
        """Where the run goes after ``step_id`` ended with ``outcome``, with ``events`` first."""
        target = self.pipeline.next_of(step_id, outcome)
        if target and record.cancel_requested:
            # Asked to stop: neither the next step nor a finish (as finish() refuses while a
            # cancel is pending). A failure with nowhere to go still fails the run.
            return preceded(cancelled(flow, record, how="requested"), events)
        if target == END:
            record.run = _progress(record, None, 0, PENDING)
            return preceded(
                Change(status=FlowStatus.FINISHED, record=record, event="finished"), events
            )
        if not target:
            record.run = _progress(record, None, 0, PENDING)
            return preceded(failed(flow, record, reason, step=step_id), events)
        if flow.id in self._hand_back:
            # Stopping: leave the next step for another executor to claim.
            record.run = _progress(record, target, 0, PENDING)
            record.current_step = target
            (kind, payload), *rest = events
            return Change(
                status=FlowStatus.RUNNING,
                record=record,
                event=kind,
                payload=payload,
                flow=self.pipeline.flow_id,
                more=tuple(rest),
            )
        return self._claim(flow, record, target, 1, events, decision)

    def _claim(
        self,
        flow: ManagedFlow,
        record: Record,
        step_id: str,
        attempt: int,
        events: list[tuple[str, dict[str, Any]]],
        decision: _Decision,
        *,
        lost: int = 0,
    ) -> Change:
        """Start attempt ``attempt`` of ``step_id`` (event ``step_started``); ``lost`` of the
        step's attempts before it stopped without an outcome."""
        claim = _claims(record.run) + 1
        record.run = _progress(record, step_id, attempt, STARTED, claims=claim)
        if lost:
            record.run["lost"] = lost
        record.current_step = step_id
        decision.action, decision.step, decision.attempt = "run", step_id, attempt
        decision.claim = claim
        started = Change(
            status=FlowStatus.RUNNING,
            record=record,
            event="step_started",
            payload={"step": step_id, "attempt": attempt},
            flow=self.pipeline.flow_id,
        )
        return preceded(started, events)


class _Attempts:
    """The attempts an executor runs on one engine, and, while one of them has run for a
    while, the watcher that cancels those whose run is cancelled through another engine or
    process (a cancel through this one reaches them at once). A step that ends soon needs no
    watcher: a cancel from elsewhere discards its end. One timer per engine checks for long
    steps, not one per step."""

    def __init__(self, executor: PipelineExecutor, engine: fs.Engine) -> None:
        self._executor = executor
        self._engine = engine
        # Run id: when its attempt began, the revision that claimed it, its claim number.
        self._running: dict[str, tuple[float, int, int]] = {}
        self._check: asyncio.TimerHandle | None = None
        self._follower: asyncio.Task[None] | None = None

    def began(self, run_id: str, claimed_rev: int, claim: int) -> None:
        self._running[run_id] = (time.monotonic(), claimed_rev, claim)
        if self._check is None:
            self._check_later()

    def runs(self, run_id: str, claim: int) -> bool:
        """True when this process runs the attempt claim number ``claim`` of ``run_id`` started."""
        running = self._running.get(run_id)
        return running is not None and running[2] == claim

    def ended(self, run_id: str) -> None:
        del self._running[run_id]
        if not self._running and self._follower is not None:
            # Nothing to follow cancels for. (The timer is left to run out: steps that end
            # at once would otherwise set and cancel one each.)
            self._follower.cancel()
            self._follower = None

    def _check_later(self) -> None:
        loop = asyncio.get_running_loop()
        self._check = loop.call_later(FOLLOW_CANCELS_AFTER, self._look)

    def _look(self) -> None:
        now = time.monotonic()
        running = self._running.values()
        long = [rev for began, rev, *_ in running if now - began >= FOLLOW_CANCELS_AFTER]
        if long and (self._follower is None or self._follower.done()):
            self._follower = asyncio.ensure_future(self._cancels(min(long)))
        self._check = None
        if self._running:
            self._check_later()

    async def _cancels(self, since_rev: int) -> None:
        labels = {RUNTIME: "pipeline", STATUS: FlowStatus.CANCELLED.value}
        executor = self._executor
        try:
            async with self._engine.watch(labels=labels, since_rev=since_rev) as cancelled:
                async for state in cancelled:
                    if state.id in executor._tasks:
                        executor.cancel_local(state.id)
        except fs.FlowstateError as exc:
            # The engine closed, or its store failed: the next long step starts a new one.
            logger.debug("stopped following cancels: %s", exc)


def _describe(exc: BaseException) -> str:
    """``Type: message`` of a step's error, as text every store can keep (a message may hold
    lone surrogates, e.g. from bytes decoded with ``surrogateescape``)."""
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 (a broken __str__ must not break the run)
        message = f"<{type(exc).__name__} whose message cannot be read>"
    text = f"{type(exc).__name__}: {message}"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def claimable(state: fs.State) -> bool:
    """True when an executor handed ``state`` (a run's version) might claim an attempt: the
    run is not over, and no live executor runs an attempt of it."""
    if not is_flow(state) or state.status != "running":
        return False
    run = read_record(state).run
    if run is None:
        return False
    return run["phase"] != STARTED or fs.recovery.attempt(state) > 0


def run_steps(run_id: str, versions: Iterable[fs.State]) -> list[FlowStep]:
    """Every attempt of a run as a step record, read from the run's history.

    A pipeline may loop back to a step: each visit of a step starts again at attempt 1, and
    the step records of its second and later visits are named ``<step>@<visit>#<attempt>``.
    """
    attempts: dict[tuple[str, int, int], dict[str, Any]] = {}
    visits: collections.Counter[str] = collections.Counter()
    for state in versions:
        for event in events_of(state):
            payload = event.payload
            if event.kind == "cancelled":
                for item in attempts.values():
                    if item["status"] is StepStatus.RUNNING:
                        item.update(status=StepStatus.CANCELLED, ended_at=event.at)
                        item["updated_at"] = event.at
                continue
            if event.kind not in ("step_started", "step_completed", "step_failed"):
                continue
            step_id, attempt = payload["step"], payload["attempt"]
            if event.kind == "step_started" and attempt == 1:
                visits[step_id] += 1  # every visit of a step starts with its attempt 1
            key = (step_id, max(visits[step_id], 1), attempt)
            item = attempts.setdefault(
                key,
                {
                    "status": StepStatus.PENDING,
                    "created_at": event.at,
                    "started_at": None,
                    "ended_at": None,
                    "result": None,
                    "error": None,
                    "revision": 0,
                },
            )
            item["updated_at"] = event.at
            item["revision"] = event.revision
            if event.kind == "step_started":
                item.update(status=StepStatus.RUNNING, started_at=event.at)
                continue
            item["ended_at"] = event.at
            item["result"] = payload.get("output")
            item["error"] = payload.get("error")
            if event.kind == "step_completed":
                item["status"] = StepStatus.COMPLETED
            else:
                item["status"] = StepStatus.FAILED
    return [
        FlowStep(
            id=f"{run_id}/steps/{_attempt_name(step_id, visit, attempt)}",
            flow_id=run_id,
            run_id=_attempt_name(step_id, visit, attempt),
            task=step_id,
            runtime="pipeline",
            status=item["status"],
            attempt=attempt,
            result=item["result"],
            error=item["error"],
            child_session_key=None,
            created_at=item["created_at"],
            updated_at=item["updated_at"],
            started_at=item["started_at"],
            ended_at=item["ended_at"],
            revision=item["revision"],
        )
        for (step_id, visit, attempt), item in attempts.items()
    ]


def _attempt_name(step_id: str, visit: int, attempt: int) -> str:
    """How a step record names an attempt: ``<step>#<attempt>``, and after the step's first
    visit ``<step>@<visit>#<attempt>``."""
    return f"{step_id}#{attempt}" if visit == 1 else f"{step_id}@{visit}#{attempt}"
