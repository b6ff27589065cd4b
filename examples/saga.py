"""An order saga: reserve stock, charge the card, ship; release the stock when the card is
declined.

Each step is a flow that calls the outside world (a :class:`Shop`: stock, payment gateway,
carrier) and then commits the next transition. A commit can fail after the call went out,
and the recoverer then runs the step again, so every call must be safe to repeat:

* ``reserve`` and ``ship`` are idempotent by order id;
* ``charge`` passes an idempotency key, so that the gateway charges an order once however
  often the step runs.

``make_flows(shop, buggy=True)`` drops that key: a retry after a failed commit charges the
card a second time. No test without faults notices; ``docs/testing.md`` shows
``flowstate.testing.flows.explore`` finding it and shrinking it to a single fault.

Run ``python -m examples.saga`` for one order through the saga.
"""

from __future__ import annotations

import asyncio

from attrs import define, field

import flowstate as fs

__all__ = ["DECLINED_CARD", "Shop", "main", "make_flows", "new_order"]

#: A card number the gateway always declines.
DECLINED_CARD = "4000-0000-0000-0002"


@define
class Shop:
    """The outside world of the saga, in memory: what a test gets to inspect afterwards.

    Attributes:
        stock: Units on the shelf, by SKU.
        reservations: Units held for an order: order id to (SKU, quantity).
        charges: Every charge that went through: (order id, amount in cents).
        shipments: The orders handed to the carrier.
    """

    stock: dict[str, int] = field(factory=lambda: {"book": 3, "lamp": 1})
    reservations: dict[str, tuple[str, int]] = field(factory=dict)
    charges: list[tuple[str, int]] = field(factory=list)
    shipments: list[str] = field(factory=list)
    _answers: dict[str, bool] = field(factory=dict)

    def reserve(self, order_id: str, sku: str, quantity: int) -> bool:
        """Hold stock for an order; False when there is not enough. Idempotent."""
        if order_id in self.reservations:
            return True
        if self.stock.get(sku, 0) < quantity:
            return False
        self.stock[sku] -= quantity
        self.reservations[order_id] = (sku, quantity)
        return True

    def release(self, order_id: str) -> None:
        """Put an order's reserved stock back on the shelf. Idempotent."""
        held = self.reservations.pop(order_id, None)
        if held is not None:
            sku, quantity = held
            self.stock[sku] += quantity

    def charge(
        self, order_id: str, cents: int, card: str, *, idempotency_key: str | None = None
    ) -> bool:
        """Charge a card; False when it is declined.

        With an ``idempotency_key`` the gateway answers a repeated request as it answered
        the first one, without charging again (as real payment gateways do).
        """
        if idempotency_key is not None and idempotency_key in self._answers:
            return self._answers[idempotency_key]
        accepted = card != DECLINED_CARD
        if accepted:
            self.charges.append((order_id, cents))
        if idempotency_key is not None:
            self._answers[idempotency_key] = accepted
        return accepted

    def ship(self, order_id: str) -> None:
        """Hand an order to the carrier. Idempotent."""
        if order_id not in self.shipments:
            self.shipments.append(order_id)


def new_order(
    order_id: str, *, sku: str = "book", quantity: int = 1, cents: int = 1500, card: str = "4242"
) -> fs.StateCtx:
    """A new order state, set to start at ``reserve`` (commit it to place the order)."""
    ctx = fs.StateCtx.new(
        order_id,
        labels={"kind": "order"},
        annotations={"sku": sku, "quantity": str(quantity), "cents": str(cents), "card": card},
    )
    ctx.current.transition = fs.Transition(to="reserve")
    return ctx


def make_flows(shop: Shop, *, buggy: bool = False) -> fs.FlowRegistry:
    """The saga's flows, acting on ``shop``.

    Args:
        shop: The outside world the flows call.
        buggy: Charge without an idempotency key, so a retried ``charge`` step charges the
            card twice.
    """
    flows = fs.FlowRegistry()

    @flows.flow("reserve")
    async def reserve(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        order = ctx.current.annotations
        if not shop.reserve(ctx.id, order["sku"], int(order["quantity"])):
            order["outcome"] = "out of stock"
            return fs.Commit(fs.End(ctx))
        return fs.Commit(fs.Transit(ctx, "charge"))

    @flows.flow("charge")
    async def charge(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        order = ctx.current.annotations
        key = None if buggy else f"{ctx.id}/charge"
        if shop.charge(ctx.id, int(order["cents"]), order["card"], idempotency_key=key):
            return fs.Commit(fs.Transit(ctx, "ship"))
        order["declined"] = "yes"
        return fs.Commit(fs.Transit(ctx, "compensate"))

    @flows.flow("ship")
    async def ship(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        shop.ship(ctx.id)
        ctx.current.annotations["outcome"] = "shipped"
        return fs.Commit(fs.End(ctx))

    @flows.flow("compensate")
    async def compensate(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        shop.release(ctx.id)
        ctx.current.annotations["outcome"] = "cancelled"
        return fs.Commit(fs.End(ctx))

    return flows


async def main() -> None:
    """Place two orders, one with a declined card, and print how they ended."""
    shop = Shop()
    async with fs.Engine("memory://", flows=make_flows(shop)) as engine:
        for order in (new_order("order-1"), new_order("order-2", card=DECLINED_CARD)):
            await engine.do(fs.Commit(fs.Noop(order)))
            await engine.execute(order)
            print(order.id, order.current.annotations["outcome"])
    print("charges:", shop.charges, "stock:", shop.stock)


if __name__ == "__main__":
    asyncio.run(main())
