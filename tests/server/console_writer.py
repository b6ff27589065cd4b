"""A writer for the console's load test: commits state versions at a steady rate.

    python -m tests.server.console_writer URL [--rate 50] [--seconds 30] [--states 10000]

It stores through ``URL`` (a ``flowstate serve``; the token comes from ``FLOWSTATE_TOKEN``),
moving the running ``load-NNNNN`` states on (never the paused ones, every 7th) and now and then
creating a new one, one commit per version. It prints ``writing`` once connected, ``wrote N
rev R`` every second, and ``done N rev R in S s`` when ``--seconds`` have passed or SIGTERM
came, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal

import flowstate as fs

FLOWS = ("step-a", "step-b", "step-c")


async def write(url: str, rate: float, seconds: float, states: int) -> None:
    async with fs.Engine(url) as engine:
        running = [i for i in range(states) if i % 7]
        held: dict[str, fs.StateCtx] = {}
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("writing", flush=True)
        start = loop.time()
        rev = written = 0
        for n in itertools.count():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, start + n / rate - loop.time()))
            if stop.is_set() or loop.time() - start >= seconds:
                break
            if n % 10 == 9:
                ctx = fs.StateCtx.new(f"load-new-{n:06d}", labels={"kind": "load", "shard": "new"})
            else:
                state_id = f"load-{running[(n * 7919) % len(running)]:05d}"
                if state_id not in held:
                    held[state_id] = await engine.get_state(state_id)
                ctx = held[state_id]
            await engine.do(fs.Commit(fs.Transit(ctx, FLOWS[n % len(FLOWS)])))
            rev = ctx.committed.rev
            written = n + 1
            if n % round(rate) == 0:
                print(f"wrote {written} rev {rev}", flush=True)
        print(f"done {written} rev {rev} in {loop.time() - start:.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=50.0, help="versions a second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--states", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(write(args.url, args.rate, args.seconds, args.states))


if __name__ == "__main__":
    main()
