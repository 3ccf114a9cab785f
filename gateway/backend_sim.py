"""A simulated cloud backend for the demo and the tests: records, checks and acknowledges.

It dedups events by id, notices any event id delivered with different content, checks that seqs
are gapless, acknowledges the contiguous prefix (``ack`` through_seq), re-subscribes after its
broker restarts and then asks for ``events.replay`` from its first missing seq, and sends
(optionally signed) commands. It is the backend's half of the contract, written independently
of the gateway's outbox code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.clock import format_rfc3339, uuid7
from gateway.signing import sign


@dataclass(slots=True)
class BackendRecord:
    """What the backend has seen so far."""

    events: dict[int, dict[str, Any]] = field(default_factory=dict)
    bodies_by_id: dict[str, str] = field(default_factory=dict)
    changed_ids: list[str] = field(default_factory=list)
    seq_reused: list[int] = field(default_factory=list)
    deliveries: int = 0
    duplicates: int = 0
    messages: int = 0
    contiguous: int = 0
    states: list[dict[str, Any]] = field(default_factory=list)
    health: list[dict[str, Any]] = field(default_factory=list)

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        """Recorded envelopes of one type, in seq order."""
        return [e for s, e in sorted(self.events.items()) if e["type"] == type_]

    def results(self) -> dict[str | None, list[dict[str, Any]]]:
        """``command.result`` data by command id (every delivery kept, duplicates included)."""
        out: dict[str | None, list[dict[str, Any]]] = {}
        for env in self.of_type("command.result"):
            out.setdefault(env["data"]["command_id"], []).append(env["data"])
        return out

    def gaps(self) -> list[int]:
        """Seqs missing below the highest seq seen."""
        top = max(self.events, default=0)
        return [s for s in range(1, top + 1) if s not in self.events]


class RecordingBackend:
    """An MQTT client playing the cloud backend (async context manager)."""

    def __init__(
        self,
        host: str,
        port: int,
        store_id: str,
        *,
        ack: bool = True,
        signing_key: Ed25519PrivateKey | None = None,
        client_id: str | None = None,
        replay_on_reconnect: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.store_id = store_id
        self.ack_enabled = ack
        self.signing_key = signing_key
        self.client_id = client_id or f"backend-{uuid7()[-12:]}"
        self.replay_on_reconnect = replay_on_reconnect
        self.record = BackendRecord()
        self.base = f"retail/v1/{store_id}"
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._connected = asyncio.Event()
        self._acked = 0
        self._dups_acked = 0

    async def __aenter__(self) -> Self:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="backend-sim")
        async with asyncio.timeout(10):
            await self._connected.wait()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        task = self._task
        if task is not None:
            # Python 3.11's asyncio.wait_for (aiomqtt's publish) can swallow a cancel that races
            # its completion; cancel again until the task has really ended.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            if not task.cancelled():
                task.exception()  # retrieved: a failure here is teardown noise, not a result

    async def _run(self) -> None:
        first = True
        while True:
            try:
                async with aiomqtt.Client(
                    self.host, self.port, identifier=self.client_id, keepalive=5, timeout=5
                ) as client:
                    await client.subscribe(f"{self.base}/#", qos=1)
                    self._client = client
                    self._connected.set()
                    if not first and self.record.contiguous and self.replay_on_reconnect:
                        await self.send_command(
                            "events.replay", {"from_seq": self.record.contiguous + 1}
                        )
                    first = False
                    async for message in client.messages:
                        await self._on_message(str(message.topic), _bytes(message.payload))
            except aiomqtt.MqttError:
                self._client = None
                self._connected.clear()
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # Python 3.11: a cancel racing an aiomqtt message can surface as MqttError
                    raise asyncio.CancelledError from None
                await asyncio.sleep(0.2)

    async def _on_message(self, topic: str, payload: bytes) -> None:
        sub = topic.removeprefix(self.base + "/")
        if sub == "events":
            self._on_events(payload)
        elif sub == "state":
            self.record.states.append(json.loads(payload))
        elif sub == "health":
            self.record.health.append(json.loads(payload))
        else:
            return
        async with self._changed:
            self._changed.notify_all()
        # Ack new progress, and re-ack when events come again: our last ack may be lost.
        rec = self.record
        progress = rec.contiguous > self._acked or rec.duplicates > self._dups_acked
        if sub == "events" and self.ack_enabled and rec.contiguous > 0 and progress:
            self._dups_acked = rec.duplicates
            await self.ack(rec.contiguous)

    def _on_events(self, payload: bytes) -> None:
        rec = self.record
        rec.messages += 1
        batch = json.loads(payload)["events"]
        for env in batch:
            body = json.dumps(env, sort_keys=True)
            rec.deliveries += 1
            known = rec.bodies_by_id.get(env["id"])
            if known is not None:
                rec.duplicates += 1
                if known != body:
                    rec.changed_ids.append(env["id"])
                continue
            seq = env["seq"]
            if seq in rec.events:
                rec.seq_reused.append(seq)  # same seq, different id: a reused number
                continue
            rec.bodies_by_id[env["id"]] = body
            rec.events[seq] = env
        while rec.contiguous + 1 in rec.events:
            rec.contiguous += 1

    async def ack(self, through_seq: int) -> None:
        """Acknowledge everything up to ``through_seq``."""
        if self._client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.publish(
                f"{self.base}/ack", json.dumps({"through_seq": through_seq}), qos=1
            )
            self._acked = max(self._acked, through_seq)

    def command_envelope(
        self,
        name: str,
        data: Mapping[str, Any],
        *,
        command_id: str | None = None,
        expires_in_s: float = 600.0,
        sign_it: bool | None = None,
    ) -> dict[str, Any]:
        """A command envelope, signed when a key is set (or as ``sign_it`` says)."""
        now = time.time()
        env: dict[str, Any] = {
            "id": command_id or f"c-{uuid7()}",
            "name": name,
            "issued_at": format_rfc3339(now),
            "expires_at": format_rfc3339(now + expires_in_s),
            "data": dict(data),
        }
        if self.signing_key is not None and sign_it is not False:
            env["sig"] = sign(env, self.signing_key)
        return env

    async def send_command(self, name: str, data: Mapping[str, Any], **kwargs: Any) -> str:
        """Send a command; returns its id."""
        env = self.command_envelope(name, data, **kwargs)
        await self.send_raw(name, json.dumps(env).encode())
        return str(env["id"])

    async def send_raw(self, name: str, payload: bytes) -> None:
        """Publish raw bytes on a command topic (for malformed-input tests)."""
        async with asyncio.timeout(10):
            await self._connected.wait()
        assert self._client is not None
        await self._client.publish(f"{self.base}/commands/{name}", payload, qos=1)

    async def wait_until(self, predicate: Any, timeout_s: float = 10.0) -> None:
        """Wait until ``predicate(record)`` holds (TimeoutError otherwise)."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: bool(predicate(self.record)))

    async def wait_for_seq(self, seq: int, timeout_s: float = 10.0) -> None:
        """Wait until every seq up to ``seq`` has arrived."""
        await self.wait_until(lambda r: r.contiguous >= seq, timeout_s)

    async def wait_for_result(
        self, command_id: str | None, timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """The (first) command.result for a command id."""
        await self.wait_until(lambda r: command_id in r.results(), timeout_s)
        return self.record.results()[command_id][0]


def _bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return str(payload).encode()
