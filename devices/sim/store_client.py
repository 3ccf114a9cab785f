"""A simulated POS terminal or locker kiosk: store-API requests over MQTT, answers awaited.

Used by the demo and the tests: ``async with StoreClient(port, "pos", "pos-1") as till`` then
``await till.request("sale", body)``, or ``fut = await till.send("sale", body)`` to pipeline.
Answers are matched by result topic and request id, first come first served, so an id sent
n times is answered n times. Payment progress (``payment/status``) is collected per request,
``store/v1/errors`` in :attr:`StoreClient.errors`; with ``record=True`` every message seen is
kept in :attr:`StoreClient.messages` for tests that inspect the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import aiomqtt

ERRORS_TOPIC = "store/v1/errors"
ID_FIELDS = {"sale": "sale_id", "return": "return_id"}
RESULT_TOPICS = {"payment/request": "payment/result"}

Body = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Message:
    """One message seen on the broker."""

    topic: str
    payload: bytes

    def json(self) -> Body:
        """The payload as a JSON object (ValueError when it is not one)."""
        body = json.loads(self.payload)
        if not isinstance(body, dict):
            raise ValueError(f"{self.topic}: not a JSON object")
        return body


class StoreClient:
    """One till (area ``pos``) or kiosk/handheld (area ``lockers``) on the store broker."""

    def __init__(
        self,
        port: int,
        area: Literal["pos", "lockers"],
        owner: str,
        *,
        host: str = "127.0.0.1",
        protocol: Literal["5", "3.1.1"] = "5",
        client_id: str | None = None,
        topics: Sequence[str] | None = None,
        record: bool = False,
        timeout_s: float = 30.0,
    ) -> None:
        """``topics`` replaces the default subscriptions (own answers, status and errors)."""
        self.area = area
        self.owner = owner
        self.base = f"store/v1/{area}/{owner}"
        self.timeout_s = timeout_s
        self._client = aiomqtt.Client(
            host,
            port,
            identifier=client_id or f"sim-{area}-{owner}",
            protocol=aiomqtt.ProtocolVersion.V5
            if protocol == "5"
            else aiomqtt.ProtocolVersion.V311,
            timeout=10,
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        self._topics = tuple(topics) if topics is not None else self._own_topics()
        self._waiting: dict[tuple[str, str], deque[asyncio.Future[Body]]] = defaultdict(deque)
        self.statuses: dict[str, list[Body]] = defaultdict(list)
        self.errors: list[Body] = []
        self._errors_taken = 0
        self.messages: list[Message] | None = [] if record else None
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None

    def _own_topics(self) -> tuple[str, ...]:
        # not the whole subtree: a till's own requests would come back to it
        base = self.base
        return (f"{base}/+/result", f"{base}/+/+/result", f"{base}/payment/status", ERRORS_TOPIC)

    async def __aenter__(self) -> Self:
        self._client.pending_calls_threshold = 100_000  # a till pipelining requests is normal
        await self._client.__aenter__()
        for topic in self._topics:
            await self._client.subscribe(topic, qos=1)
        self._reader = asyncio.get_running_loop().create_task(
            self._read(), name=f"sim-{self.owner}"
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._client.__aexit__(et, e, tb)

    # --- inbound ------------------------------------------------------------------------------

    async def _read(self) -> None:
        async for message in self._client.messages:
            raw = message.payload
            payload = bytes(raw) if isinstance(raw, bytes | bytearray) else str(raw).encode()
            self._take(str(message.topic), payload)
            async with self._changed:
                self._changed.notify_all()

    def _take(self, topic: str, payload: bytes) -> None:
        if self.messages is not None:
            self.messages.append(Message(topic, payload))
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        if topic == ERRORS_TOPIC:
            self.errors.append(body)
            return
        suffix = topic.removeprefix(self.base + "/")
        if suffix == "payment/status":
            self.statuses[str(body.get("request_id"))].append(body)
            return
        id_field = ID_FIELDS.get(suffix.removesuffix("/result"), "request_id")
        key = (suffix, str(body.get(id_field)))
        queue = self._waiting.get(key)
        if not queue:
            return
        fut = queue.popleft()  # the oldest send of this id (its waiter may have given up)
        if not queue:
            del self._waiting[key]
        if not fut.done():
            fut.set_result(body)

    async def wait(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; re-checked on every message."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(predicate)

    async def next_error(self, timeout_s: float = 5.0) -> Body:
        """The next message on ``store/v1/errors`` not yet returned by this method."""
        await self.wait(lambda: len(self.errors) > self._errors_taken, timeout_s)
        self._errors_taken += 1
        return self.errors[self._errors_taken - 1]

    def on(self, suffix: str, request_id: str | None = None) -> list[Body]:
        """Recorded JSON bodies on ``store/v1/<area>/+/<suffix>`` (of one request id if given)."""
        out = []
        for m in self._recorded():
            parts = m.topic.split("/")
            if len(parts) >= 5 and parts[2] == self.area and "/".join(parts[4:]) == suffix:
                body = m.json()
                if request_id is None or body.get("request_id") == request_id:
                    out.append(body)
        return out

    def topics(self, suffix: str) -> list[str]:
        """Topics of the recorded messages ending in ``suffix``."""
        return [m.topic for m in self._recorded() if m.topic.endswith(suffix)]

    def _recorded(self) -> list[Message]:
        if self.messages is None:
            raise RuntimeError("this client does not record messages (record=True)")
        return self.messages

    # --- outbound -----------------------------------------------------------------------------

    async def send(self, action: str, body: Body) -> asyncio.Future[Body]:
        """Publish a request now; the returned future resolves with its answer."""
        id_field = ID_FIELDS.get(action, "request_id")
        result = RESULT_TOPICS.get(action, f"{action}/result")
        fut: asyncio.Future[Body] = asyncio.get_running_loop().create_future()
        self._waiting[(result, str(body[id_field]))].append(fut)
        await self.publish_raw(action, json.dumps(body).encode())
        return fut

    async def request(self, action: str, body: Body, *, timeout_s: float | None = None) -> Body:
        """Publish a request and wait for its answer on the matching result topic."""
        fut = await self.send(action, body)
        async with asyncio.timeout(self.timeout_s if timeout_s is None else timeout_s):
            return await fut

    async def publish_raw(self, action: str, payload: bytes, *, owner: str | None = None) -> None:
        """Publish bytes on the request topic ``action`` of this owner (or of ``owner``)."""
        topic = f"store/v1/{self.area}/{owner or self.owner}/{action}"
        await self._client.publish(topic, payload, qos=1)
