"""Test helpers for card payments: a till on the store broker, terminal settings, leak scans."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiomqtt

FAST_TERMINAL: dict[str, Any] = {
    "t1_ms": 100, "t2_s": 0.3, "t3_s": 0.5, "t4_s": 2.0, "status_interval_s": 30,
    "connect_timeout_s": 1,
}  # fmt: skip


def terminal(endpoint: str, **overrides: Any) -> dict[str, Any]:
    """A payment terminal config entry with fast timings, serving tills pos-1 and pos-2."""
    return {"id": "pt-1", "endpoint": endpoint, "pos_terminals": ["pos-1", "pos-2"],
            **FAST_TERMINAL, **overrides}  # fmt: skip


@dataclass(slots=True)
class Message:
    """One message seen on the store broker."""

    topic: str
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The payload as a JSON object."""
        body = json.loads(self.payload)
        assert isinstance(body, dict)
        return body


@dataclass(slots=True)
class PosClient:
    """A till: publishes payment requests and records everything under ``subscribe``."""

    port: int
    subscribe: str = "store/v1/#"
    messages: list[Message] = field(default_factory=list)
    _client: aiomqtt.Client | None = None
    _reader: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> Self:
        self._client = aiomqtt.Client(
            "127.0.0.1", self.port, identifier=f"till-{uuid.uuid4().hex[:8]}"
        )
        await self._client.__aenter__()
        await self._client.subscribe(self.subscribe, qos=1)
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="till-reader")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._client is not None:
            await self._client.__aexit__(et, e, tb)

    async def _read(self) -> None:
        assert self._client is not None
        async for msg in self._client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
            self.messages.append(Message(str(msg.topic), payload))
            self._changed.set()

    async def wait(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; re-checked on every message."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def send(
        self, body: dict[str, Any] | bytes, till: str = "pos-1", action: str = "payment/request"
    ) -> None:
        """Publish a request (QoS 1)."""
        assert self._client is not None
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        await self._client.publish(f"store/v1/pos/{till}/{action}", payload, qos=1)

    def on(self, suffix: str, request_id: str | None = None) -> list[dict[str, Any]]:
        """JSON bodies seen on ``store/v1/pos/+/<suffix>`` (for one request_id if given)."""
        out = []
        for m in self.messages:
            parts = m.topic.split("/")
            if len(parts) >= 5 and parts[2] == "pos" and "/".join(parts[4:]) == suffix:
                body = m.json()
                if request_id is None or body.get("request_id") == request_id:
                    out.append(body)
        return out

    def topics(self, suffix: str) -> list[str]:
        """Topics of the messages ending in ``suffix``."""
        return [m.topic for m in self.messages if m.topic.endswith(suffix)]

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
