"""Test tills: :class:`Till` is the simulator's StoreClient as a POS; request body builders."""

from __future__ import annotations

import asyncio
from typing import Any

from devices.sim.store_client import StoreClient
from gateway.app import Gateway


class Till(StoreClient):
    """One POS terminal on the store broker: MQTT 3.1.1, answers awaited for 10 s."""

    def __init__(self, port: int, terminal: str = "pos-1", *, host: str = "127.0.0.1") -> None:
        super().__init__(
            port,
            "pos",
            terminal,
            host=host,
            protocol="3.1.1",
            client_id=f"till-{terminal}",
            timeout_s=10.0,
        )
        self.terminal = terminal


def sale(
    sale_id: str,
    lines: list[tuple[str, int, int]],
    *,
    currency: str = "EUR",
    method: str = "card",
    **overrides: Any,
) -> dict[str, Any]:
    """A valid sale request body (``lines`` as (sku, qty, unit_price_minor))."""
    total = sum(q * p for _, q, p in lines)
    body: dict[str, Any] = {
        "sale_id": sale_id,
        "lines": [{"sku": s, "qty": q, "unit_price_minor": p} for s, q, p in lines],
        "total_minor": total,
        "currency": currency,
        "payments": [{"method": method, "amount_minor": total}] if total else [],
        "completed_at": "2026-11-22T18:00:00.000Z",
    }
    body.update(overrides)
    return body


def return_(return_id: str, lines: list[tuple[str, int, int]], **overrides: Any) -> dict[str, Any]:
    """A valid return request body without payments."""
    body = sale(return_id, lines)
    del body["sale_id"], body["payments"]
    body["return_id"] = return_id
    body.update(overrides)
    return body


async def wait_store_bus(gw: Gateway, timeout_s: float = 10.0) -> None:
    """Wait until the gateway's store-bus link is up (its subscriptions are in place)."""
    async with asyncio.timeout(timeout_s):
        while not gw.store_bus.link.connected:  # noqa: ASYNC110 - test helper, bounded
            await asyncio.sleep(0.02)
