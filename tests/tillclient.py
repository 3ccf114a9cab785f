"""A small till for tests and the benchmark: publishes store-bus requests and awaits results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import defaultdict, deque
from types import TracebackType
from typing import Any, Self

import aiomqtt

from gateway.app import Gateway

ID_FIELDS = {"sale": "sale_id", "return": "return_id", "stock": "request_id"}


class Till:
    """One POS terminal on the store broker (async context manager)."""

    def __init__(self, port: int, terminal: str = "pos-1", *, host: str = "127.0.0.1") -> None:
        self.terminal = terminal
        self._client = aiomqtt.Client(
            host,
            port,
            identifier=f"till-{terminal}",
            timeout=10,
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        self._waiting: dict[tuple[str, str], deque[asyncio.Future[dict[str, Any]]]] = defaultdict(
            deque
        )
        self.errors: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self._client.__aenter__()
        await self._client.subscribe(f"store/v1/pos/{self.terminal}/+/result", qos=1)
        await self._client.subscribe("store/v1/errors", qos=1)
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="till-reader")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._client.__aexit__(et, e, tb)

    async def _read(self) -> None:
        async for message in self._client.messages:
            topic = str(message.topic)
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            body = json.loads(payload)
            if topic == "store/v1/errors":
                self.errors.put_nowait(body)
                continue
            action = topic.split("/")[4]
            key = (action, str(body[ID_FIELDS[action]]))
            queue = self._waiting.get(key)
            if queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_result(body)

    async def send(self, action: str, body: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Publish a request now; the returned future resolves with its result."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[(action, str(body[ID_FIELDS[action]]))].append(fut)
        await self.publish_raw(action, json.dumps(body).encode())
        return fut

    async def request(
        self, action: str, body: dict[str, Any], *, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """Publish a request and wait for its result."""
        fut = await self.send(action, body)
        async with asyncio.timeout(timeout_s):
            return await fut

    async def publish_raw(self, action: str, payload: bytes) -> None:
        """Publish raw bytes on this terminal's request topic."""
        await self._client.publish(f"store/v1/pos/{self.terminal}/{action}", payload, qos=1)

    async def next_error(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """The next message on store/v1/errors."""
        async with asyncio.timeout(timeout_s):
            return await self.errors.get()


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
