"""A simulated POS terminal or locker kiosk: store-API requests over MQTT, answers awaited.

Used by the demo (and usable by tests): ``async with StoreClient(port, "pos", "pos-1") as till``
then ``await till.request("sale", body)``. Replies are matched by topic and request id; payment
progress (``payment/status``) is collected per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import defaultdict
from types import TracebackType
from typing import Any, Literal, Self

import aiomqtt

ID_FIELDS = {"sale": "sale_id", "return": "return_id"}
RESULT_TOPICS = {"payment/request": "payment/result"}


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
    ) -> None:
        self.area = area
        self.owner = owner
        self.base = f"store/v1/{area}/{owner}"
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
        self._waiting: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        self.statuses: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.errors: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._client.pending_calls_threshold = 100_000  # a till pipelining requests is normal
        await self._client.__aenter__()
        await self._client.subscribe(f"{self.base}/#", qos=1)
        await self._client.subscribe("store/v1/errors", qos=1)
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

    async def _read(self) -> None:
        async for message in self._client.messages:
            topic = str(message.topic)
            try:
                body = json.loads(bytes(message.payload))  # type: ignore[arg-type,unused-ignore]
            except (TypeError, ValueError):
                continue
            if topic == "store/v1/errors":
                self.errors.append(body)
                continue
            suffix = topic.removeprefix(self.base + "/")
            if suffix == "payment/status":
                self.statuses[str(body.get("request_id"))].append(body)
                continue
            for field in ("request_id", "sale_id", "return_id"):
                fut = self._waiting.get((suffix, str(body.get(field))))
                if fut is not None and not fut.done():
                    fut.set_result(body)
                    break

    async def request(
        self, action: str, body: dict[str, Any], *, timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Publish a request and wait for its answer on the matching result topic."""
        id_field = ID_FIELDS.get(action, "request_id")
        result = RESULT_TOPICS.get(action, f"{action}/result")
        key = (result, str(body[id_field]))
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        try:
            await self._client.publish(f"{self.base}/{action}", json.dumps(body), qos=1)
            async with asyncio.timeout(timeout_s):
                return await fut
        finally:
            self._waiting.pop(key, None)
