"""A payment request as a pipeline: per-step timeouts and retries, and a failure branch.

A flaky payment gateway fails the configuration step twice (retried with backoff), then the
run confirms it and creates the product; when the catalogue refuses the product (a
``{"status": "failure"}`` outcome, not an error) the run refunds instead of shipping.

Run ``python -m examples.payment_pipeline [sqlite:///payments.db]``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import flowstate as fs
from flowstate.workflows import FlowManager, Pipeline, Step, StepContext

__all__ = ["Gateway", "main", "make_pipeline"]


class Gateway:
    """The outside world: a payment gateway that fails its first two calls, and a catalogue."""

    def __init__(self, *, stock: set[str]) -> None:
        self.calls = 0
        self.stock = stock
        self.refunds: list[str] = []

    async def configure(self, step: StepContext) -> Any:
        self.calls += 1
        if self.calls <= 2:
            raise ConnectionError("gateway unavailable")
        return {"account": "acct_1", "currency": "eur"}

    async def confirm(self, step: StepContext) -> Any:
        return {"confirmed": step.outputs["stripe_config"]["account"]}

    async def create_product(self, step: StepContext) -> Any:
        sku = step.input["sku"]
        if sku not in self.stock:
            return {"status": "failure", "reason": f"{sku} is not in the catalogue"}
        return {"product": f"prod_{sku}"}

    async def refund(self, step: StepContext) -> Any:
        self.refunds.append(step.run_id)
        return {"refunded": True}


def make_pipeline(gateway: Gateway) -> Pipeline:
    return (
        Pipeline("stripe_payment_request", name="Take a payment and create the product")
        .add_step(Step("stripe_config", gateway.configure, timeout=5, retries=2, backoff=0.1))
        .add_step(Step("stripe_config_confirm", gateway.confirm, timeout=5))
        .add_step(
            Step(
                "create_product",
                gateway.create_product,
                timeout=10,
                retries=1,
                on_success="end",
                on_failure="refund",
            )
        )
        .add_step(Step("refund", gateway.refund, timeout=5))
    )


async def main(url: str) -> None:
    gateway = Gateway(stock={"book"})
    async with fs.Engine(url) as engine:
        flows = FlowManager(engine)
        flows.register(make_pipeline(gateway))
        for sku in ("book", "lamp"):
            run = await flows.execute("stripe_payment_request", input={"sku": sku}, owner="shop")
            done = await flows.result(run.id, timeout=30)
            steps = [f"{s.task}#{s.attempt}:{s.status}" for s in await flows.steps(run.id)]
            print(f"{sku}: {done.status} via {', '.join(steps)}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "sqlite:///payments.db"))
