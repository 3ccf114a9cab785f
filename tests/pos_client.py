"""Test helpers for card payments: a recording till, terminal settings, leak scans."""

from __future__ import annotations

import json
import re
import uuid
from types import TracebackType
from typing import Any, Self

from devices.sim.store_client import Message, StoreClient

FAST_TERMINAL: dict[str, Any] = {
    "t1_ms": 100, "t2_s": 0.3, "t3_s": 0.5, "t4_s": 2.0, "status_interval_s": 30,
    "connect_timeout_s": 1,
}  # fmt: skip


def terminal(endpoint: str, **overrides: Any) -> dict[str, Any]:
    """A payment terminal config entry with fast timings, serving tills pos-1 and pos-2."""
    return {"id": "pt-1", "endpoint": endpoint, "pos_terminals": ["pos-1", "pos-2"],
            **FAST_TERMINAL, **overrides}  # fmt: skip


class PosClient:
    """A till watching the store broker: the simulator's StoreClient recording ``subscribe``.

    Requests go to any till (``send(body, till)``); answers are read from the record, so a
    test sees every copy the gateway published, on every till's topics.
    """

    def __init__(self, port: int, subscribe: str = "store/v1/#") -> None:
        self.client = StoreClient(
            port,
            "pos",
            "pos-1",
            protocol="3.1.1",
            client_id=f"till-{uuid.uuid4().hex[:8]}",
            topics=(subscribe,),
            record=True,
        )
        assert self.client.messages is not None
        self.messages: list[Message] = self.client.messages  # the same list, filled as it arrives
        self.wait = self.client.wait
        self.on = self.client.on
        self.topics = self.client.topics

    async def __aenter__(self) -> Self:
        await self.client.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.client.__aexit__(et, e, tb)

    async def send(
        self, body: dict[str, Any] | bytes, till: str = "pos-1", action: str = "payment/request"
    ) -> None:
        """Publish a request (QoS 1) on ``till``'s topic."""
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        await self.client.publish_raw(action, payload, owner=till)

    async def result(
        self, request_id: str, nth: int = 1, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """The ``nth`` payment/result for a request_id, once it arrived."""
        await self.wait(lambda: len(self.on("payment/result", request_id)) >= nth, timeout_s)
        return self.on("payment/result", request_id)[nth - 1]

    async def pay(
        self, till: str = "pos-1", timeout_s: float = 10.0, **body: Any
    ) -> dict[str, Any]:
        """Send a payment request and return its (next) result."""
        rid = body["request_id"]
        seen = len(self.on("payment/result", rid))
        await self.send(body, till)
        return await self.result(rid, seen + 1, timeout_s)


# --- card data scans ------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![0-9A-Za-z])\d{13,19}(?![0-9A-Za-z])")


def luhn_ok(digits: str) -> bool:
    """The Luhn check of a digit string."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def card_numbers(data: bytes | str, known: tuple[str, ...] = ()) -> list[str]:
    """Luhn-valid 13-19 digit numbers in ``data``, plus any of the ``known`` PANs anywhere."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    found = [m.group() for m in _NUMBER.finditer(text) if luhn_ok(m.group())]
    return found + [pan for pan in known if pan in text]
