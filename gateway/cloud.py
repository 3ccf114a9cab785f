"""The cloud link (cloud-api.md): state/birth/will, event drain, acks, commands, health."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
import structlog
from pydantic import BaseModel, ConfigDict, Field

from gateway import __version__
from gateway.clock import now_rfc3339
from gateway.commands import Command, CommandDispatcher, CommandSpec, Outcome
from gateway.config import CloudSection
from gateway.db import Database
from gateway.drain import Drainer
from gateway.jsonedge import parse_json
from gateway.mqtt import Inbound, MqttLink, Outbound
from gateway.outbox import Outbox

log = structlog.get_logger(__name__)


class Topics:
    """The cloud topic tree of one store."""

    def __init__(self, store_id: str) -> None:
        base = f"retail/v1/{store_id}"
        self.state = f"{base}/state"
        self.events = f"{base}/events"
        self.health = f"{base}/health"
        self.ack = f"{base}/ack"
        self.commands_prefix = f"{base}/commands/"
        self.commands = f"{base}/commands/+"


class ReplayData(BaseModel):
    """``events.replay`` data."""

    model_config = ConfigDict(extra="ignore", strict=True)
    from_seq: int = Field(ge=1)


class CloudLink:
    """Owns the cloud MQTT link and everything that flows over it."""

    def __init__(
        self,
        settings: CloudSection,
        *,
        store_id: str,
        boot_id: str,
        db: Database,
        outbox: Outbox,
        dispatcher: CommandDispatcher,
        health: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self.settings = settings
        self.store_id = store_id
        self.boot_id = boot_id
        self.db = db
        self.outbox = outbox
        self.dispatcher = dispatcher
        self.health = health
        self.topics = Topics(store_id)
        self.drainer = Drainer(
            outbox,
            max_inflight=settings.max_inflight,
            max_batch=settings.max_batch,
            resend_after_s=settings.resend_after_s,
            max_publish_rate=settings.max_publish_rate,
        )
        db.add_commit_listener(self.drainer.notify_committed)
        dispatcher.register(
            "events.replay", CommandSpec(handler=self._replay, data_model=ReplayData)
        )
        self.link = MqttLink(
            "cloud",
            settings,
            client_id=settings.client_id or store_id,
            subscriptions=(self.topics.ack, self.topics.commands),
            on_message=self._on_message,
            will=Outbound(
                self.topics.state, self._state_payload("offline", reason="connection-lost")
            ),
            birth=lambda: Outbound(self.topics.state, self._birth_payload()),
            goodbye=lambda: Outbound(
                self.topics.state, self._state_payload("offline", reason="shutdown")
            ),
            session=self._session,
        )

    def _state_payload(self, state: str, **extra: Any) -> bytes:
        return json.dumps({"state": state, "boot_id": self.boot_id, **extra}).encode()

    def _birth_payload(self) -> bytes:
        return self._state_payload(
            "online", version=__version__, since=now_rfc3339(), last_seq=self.db.last_seq
        )

    async def run(self) -> None:
        """Run the link until stopped."""
        await self.link.run()

    def request_stop(self) -> None:
        """Goodbye, disconnect, return from :meth:`run`."""
        self.link.request_stop()

    async def _session(self, client: aiomqtt.Client) -> None:
        topic = self.topics.events
        timeout_s = float(self.settings.keepalive_s * 2)

        async def publish(payload: bytes) -> None:
            await client.publish(topic, payload, qos=1, timeout=timeout_s)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.drainer.run(publish), name="cloud-drain")
            if self.health is not None:
                tg.create_task(self._health_loop(client), name="cloud-health")

    async def _health_loop(self, client: aiomqtt.Client) -> None:
        assert self.health is not None
        while True:
            payload = json.dumps(await self.health()).encode()
            await client.publish(self.topics.health, payload, qos=0)
            await asyncio.sleep(self.settings.health_interval_s)

    async def _on_message(self, msg: Inbound) -> None:
        if msg.topic == self.topics.ack:
            await self._on_ack(msg.payload)
        elif msg.topic.startswith(self.topics.commands_prefix):
            await self.dispatcher.handle(
                msg.topic.removeprefix(self.topics.commands_prefix), msg.payload
            )
        else:
            log.warning("message on an unexpected topic ignored", topic=msg.topic)

    async def _on_ack(self, payload: bytes) -> None:
        try:
            body = parse_json(payload)
            through = body["through_seq"]
            if not isinstance(through, int) or isinstance(through, bool) or through < 0:
                raise TypeError("through_seq must be a non-negative integer")
        except (ValueError, KeyError, TypeError) as err:
            log.warning(
                "malformed ack ignored",
                error=str(err),
                payload=payload[:200].decode(errors="replace"),
            )
            return
        if self.outbox.ack(through):
            self.drainer.notify_acked()

    async def _replay(self, _cmd: Command, data: ReplayData) -> Outcome:
        first = await self.outbox.first_held_seq()
        self.drainer.replay(data.from_seq)
        return Outcome(data={"from_seq": data.from_seq, "first_held_seq": first})
