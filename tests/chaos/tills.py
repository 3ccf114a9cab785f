"""Simulated tills for the chaos runs: they survive broker restarts and retry like a real till.

A till keeps up to ``inflight`` requests outstanding, each with its own id. A request without a
final answer is sent again, with the same id and the same body, every ``retry_s`` and after every
reconnect — exactly what a POS does when the gateway, the broker or the network was away. An
answer is final unless it says "try again" (``storage-error``) or, for payments, ``busy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from tests.tillclient import return_, sale


def ean13(stem: str) -> str:
    """``stem`` (12 digits) with its GS1 check digit: a real-looking article number."""
    odd_even = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(stem))
    return stem + str((10 - odd_even % 10) % 10)


SKUS = tuple(ean13(f"400638133{n:03d}") for n in range(8))

RETRYABLE_CODES = {"storage-error"}


@dataclass(slots=True)
class Pending:
    """A request the till has not got a final answer for."""

    action: str  # "sale", "return", "payment/request"
    id_field: str
    body: dict[str, Any]
    sends: int = 0
    last_sent: float = 0.0


@dataclass(slots=True)
class TillLog:
    """What a till asked and what it was told."""

    sent: dict[str, Pending] = field(default_factory=dict)  # every request ever made, by id
    finals: dict[str, dict[str, Any]] = field(default_factory=dict)  # first final answer
    replies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # every answer
    resends: int = 0
    reconnects: int = 0


Generator = Callable[[random.Random, int], Pending]


def sales_and_returns(terminal: str, return_share: float = 0.2) -> Generator:
    """Sales (1 to 3 lines) and, now and then, a return; ids ``<terminal>-s-N`` / ``-r-N``."""

    def make(rng: random.Random, n: int) -> Pending:
        lines = [
            (rng.choice(SKUS), rng.randint(1, 3), rng.randint(50, 2000))
            for _ in range(rng.randint(1, 3))
        ]
        if rng.random() < return_share:
            rid = f"{terminal}-r-{n:06d}"
            return Pending("return", "return_id", return_(rid, lines))
        sid = f"{terminal}-s-{n:06d}"
        return Pending("sale", "sale_id", sale(sid, lines, method=rng.choice(["cash", "card"])))

    return make


def payments(terminal: str, base_amount: int) -> Generator:
    """Card purchases, each with its own amount (the simulator's ledger is keyed by amount)."""

    def make(_rng: random.Random, n: int) -> Pending:
        body = {
            "request_id": f"{terminal}-p-{n:05d}",
            "kind": "purchase",
            "amount_minor": base_amount + n,
            "currency": "EUR",
        }
        return Pending("payment/request", "request_id", body)

    return make


class ChaosTill:
    """One till on the store broker; run :meth:`run` until ``stop`` is set, then :meth:`settle`."""

    def __init__(
        self,
        port: int,
        terminal: str,
        generator: Generator,
        *,
        seed: int,
        inflight: int = 4,
        pause_s: float = 0.02,
        retry_s: float = 1.5,
    ) -> None:
        self.port = port
        self.terminal = terminal
        self.generator = generator
        self.seed = seed
        self.rng = random.Random(seed)
        self.inflight = inflight
        self.pause_s = pause_s
        self.retry_s = retry_s
        self.log = TillLog()
        self.pending: dict[str, Pending] = {}
        self._client: aiomqtt.Client | None = None
        self._answered = asyncio.Event()
        self._made = 0

    @property
    def unanswered(self) -> int:
        """Requests still without a final answer."""
        return len(self.pending)

    async def run(self, stop_new: asyncio.Event, stop_all: asyncio.Event) -> None:
        """Connect (and reconnect), make requests until ``stop_new``, retry until ``stop_all``."""
        async with asyncio.TaskGroup() as tg:
            link = tg.create_task(self._link(stop_all), name=f"till-{self.terminal}-link")
            await self._produce(stop_new, stop_all)
            link.cancel()

    async def _link(self, stop_all: asyncio.Event) -> None:
        while not stop_all.is_set():
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier=f"chaos-till-{self.terminal}-{self.seed}",
                    keepalive=5,
                    timeout=3,
                    socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
                ) as client:
                    await client.subscribe(f"store/v1/pos/{self.terminal}/+/result", qos=1)
                    await client.subscribe(f"store/v1/pos/{self.terminal}/payment/result", qos=1)
                    self._client = client
                    self.log.reconnects += 1
                    for p in list(self.pending.values()):
                        await self._send(p)
                    async for message in client.messages:
                        self._on_reply(str(message.topic), message.payload)
            except aiomqtt.MqttError:
                pass
            finally:
                self._client = None
            await asyncio.sleep(0.2)

    async def _produce(self, stop_new: asyncio.Event, stop_all: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop_all.is_set():
            if not stop_new.is_set() and len(self.pending) < self.inflight:
                p = self.generator(self.rng, self._made)
                self._made += 1
                rid = str(p.body[p.id_field])
                self.pending[rid] = p
                self.log.sent[rid] = p
                await self._send(p)
                await asyncio.sleep(self.pause_s)
                continue
            now = loop.time()
            for p in list(self.pending.values()):
                if now - p.last_sent >= self.retry_s:
                    self.log.resends += 1
                    await self._send(p)
            self._answered.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await self._answered.wait()

    async def _send(self, p: Pending) -> None:
        p.last_sent = asyncio.get_running_loop().time()
        p.sends += 1
        client = self._client
        if client is None:
            return
        topic = f"store/v1/pos/{self.terminal}/{p.action}"
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(topic, json.dumps(p.body).encode(), qos=1)

    def _on_reply(self, topic: str, payload: Any) -> None:
        action = topic.split("/", 4)[4].removesuffix("/result")
        body = json.loads(payload)
        id_field = {"sale": "sale_id", "return": "return_id"}.get(action, "request_id")
        rid = body.get(id_field)
        if not isinstance(rid, str) or rid not in self.log.sent:
            return
        self.log.replies.setdefault(rid, []).append(body)
        if _retryable(body):
            return
        self.log.finals.setdefault(rid, body)
        if self.pending.pop(rid, None) is not None:
            self._answered.set()

    async def ask_stock(self, skus: list[str], timeout_s: float = 10.0) -> dict[str, Any]:
        """One stock lookup (retried until answered)."""
        rid = f"{self.terminal}-stock-{self.rng.getrandbits(32):08x}"
        p = Pending("stock", "request_id", {"request_id": rid, "skus": skus})
        self.log.sent[rid] = p
        self.pending[rid] = p
        async with asyncio.timeout(timeout_s):
            while rid in self.pending:
                await self._send(p)
                self._answered.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._answered.wait()
        return self.log.finals[rid]


def _retryable(body: dict[str, Any]) -> bool:
    status = body.get("status")
    if status == "busy":
        return True
    error = body.get("error")
    return status == "rejected" and isinstance(error, dict) and error.get("code") in RETRYABLE_CODES
