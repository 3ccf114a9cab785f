"""The store bus (store-api.md): presence, and one dispatch table for every request topic.

This is the only place where inbound store JSON becomes typed requests. A request whose id can
be read always gets an answer on its ``…/result`` topic (``rejected`` with ``error: {code,
message}`` naming the field when invalid); one whose id cannot be read gets an error on
``store/v1/errors``. Handlers run concurrently (bounded), so a slow till never blocks another.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiomqtt
import structlog
from pydantic import BaseModel, ValidationError

from gateway import __version__
from gateway.carddata import REFUSED, card_number_field, find_pan
from gateway.config import StoreBusSection
from gateway.errors import StorageError, StorageFull
from gateway.jsonedge import BadJson, parse_json
from gateway.linkstate import LinkState, StateCell
from gateway.mqtt import Inbound, MqttLink, Outbound

log = structlog.get_logger(__name__)

STATE_TOPIC = "store/v1/gateway/state"
ERRORS_TOPIC = "store/v1/errors"
MAX_ID_LEN = 64


class RequestError(Exception):
    """A request that is well-formed JSON but cannot be served; becomes ``rejected``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Request:
    """Where a request came from and how to answer it."""

    topic: str
    owner: str  # the POS terminal id or the locker bank id in the topic
    request_id: str
    reply_topic: str
    bus: StoreBus

    async def publish(self, suffix: str, body: Mapping[str, Any]) -> None:
        """Publish a side message under the owner's topics (``payment/status`` → …/{owner}/payment/status)."""
        base = "/".join(self.topic.split("/")[:4])  # store/v1/{area}/{owner}
        await self.bus.publish_json(f"{base}/{suffix}", body)


Handler = Callable[[Request, Any], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class Route:
    """One request topic: ``store/v1/{area}/+/{action}`` → model → handler → reply topic."""

    area: str  # "pos" or "lockers"
    action: str  # e.g. "sale", "payment/request"
    id_field: str
    model: type[BaseModel]
    handler: Handler
    result: str  # reply suffix, e.g. "sale/result", "payment/result"


class StoreBus:
    """Owns the store MQTT link, presence and request dispatch."""

    def __init__(
        self,
        settings: StoreBusSection,
        *,
        store_id: str,
        boot_id: str,
        cloud_state: StateCell,
    ) -> None:
        self.settings = settings
        self.boot_id = boot_id
        self.cloud_state = cloud_state
        self.routes: dict[tuple[str, str], Route] = {}
        self.link = MqttLink(
            "store_bus",
            settings,
            client_id=settings.client_id or f"store-gateway-{store_id}",
            subscriptions=(),  # set from the routes in run()
            on_message=self._on_message,
            will=Outbound(STATE_TOPIC, self._presence("offline")),
            birth=lambda: Outbound(STATE_TOPIC, self._presence("online")),
            goodbye=lambda: Outbound(STATE_TOPIC, self._presence("offline")),
            concurrency=settings.max_concurrent_requests,
            session=self._presence_loop,
        )
        self._presence_changed = asyncio.Event()
        cloud_state.listeners.append(self._on_cloud_state)
        self.stats = {"requests": 0, "rejected": 0, "unreadable": 0}

    def add_route(self, route: Route) -> None:
        """Register a request topic in the dispatch table."""
        self.routes[(route.area, route.action)] = route

    async def run(self) -> None:
        """Run the link until stopped (subscribed to the request topics of the routes only)."""
        self.link.subscriptions = tuple(
            sorted({f"store/v1/{r.area}/+/{r.action}" for r in self.routes.values()})
        )
        await self.link.run()

    def request_stop(self) -> None:
        """Goodbye and disconnect."""
        self.link.request_stop()

    def _presence(self, state: str) -> bytes:
        cloud = "connected" if self.cloud_state.value == LinkState.CONNECTED else "disconnected"
        return json.dumps(
            {"state": state, "boot_id": self.boot_id, "version": __version__, "cloud": cloud}
        ).encode()

    def _on_cloud_state(self, _name: str, _value: str) -> None:
        self._presence_changed.set()

    async def _presence_loop(self, client: aiomqtt.Client) -> None:
        """Re-publish presence whenever the cloud link changes (tills show offline mode)."""
        while True:
            await self._presence_changed.wait()
            self._presence_changed.clear()
            await client.publish(STATE_TOPIC, self._presence("online"), qos=1, retain=True)

    async def publish_json(
        self, topic: str, body: Mapping[str, Any], *, retain: bool = False
    ) -> None:
        """Publish a JSON body at QoS 1."""
        await self.link.publish(topic, json.dumps(body, ensure_ascii=False).encode(), retain=retain)

    # --- dispatch -----------------------------------------------------------------------------

    async def _on_message(self, msg: Inbound) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 5 or parts[0] != "store" or parts[1] != "v1":
            return
        area, owner, action = parts[2], parts[3], "/".join(parts[4:])
        route = self.routes.get((area, action))
        if route is None:
            return  # our own replies, status topics and retained state come back here too
        self.stats["requests"] += 1
        if find_pan(owner):
            # answering would echo the number in the reply topic: drop it, say so without it
            self.stats["unreadable"] += 1
            log.warning("request on a topic holding a card number dropped", area=area)
            return
        body = _parse_object(msg.payload)
        if isinstance(body, str):
            await self._unreadable(msg.topic, "invalid-json", body)
            return
        rid = body.get(route.id_field)
        if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_LEN:
            await self._unreadable(
                msg.topic,
                "invalid-id",
                f"{route.id_field} must be a non-empty string of at most {MAX_ID_LEN} characters",
            )
            return
        if find_pan(rid):
            await self._unreadable(
                msg.topic, REFUSED, f"{route.id_field} looks like a card number; not accepted"
            )
            return
        base = f"store/v1/{area}/{owner}"
        req = Request(msg.topic, owner, rid, f"{base}/{route.result}", self)
        structlog.contextvars.bind_contextvars(request_id=rid)
        try:
            reply = await self._serve(route, req, body)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
        await self.publish_json(req.reply_topic, reply)

    async def _serve(self, route: Route, req: Request, body: dict[str, Any]) -> Mapping[str, Any]:
        try:
            typed = route.model.model_validate(body)
            where = card_number_field(typed.model_dump(mode="json"))
            if where is not None:
                return self._rejected(
                    route,
                    req,
                    REFUSED,
                    f"{where}: looks like a card number; card data goes to the payment terminal only",
                )
            return await route.handler(req, typed)
        except ValidationError as err:
            return self._rejected(route, req, "invalid", _describe(err))
        except RequestError as err:
            return self._rejected(route, req, err.code, err.message)
        except StorageFull as err:
            return self._rejected(
                route, req, "storage-full", f"not recorded, storage is full: {err}"
            )
        except StorageError as err:
            return self._rejected(route, req, "storage-error", f"not recorded, try again: {err}")

    def _rejected(self, route: Route, req: Request, code: str, message: str) -> dict[str, Any]:
        self.stats["rejected"] += 1
        log.info("request rejected", topic=req.topic, code=code, message=message)
        return {
            route.id_field: req.request_id,
            "status": "rejected",
            "error": {"code": code, "message": message},
        }

    async def _unreadable(self, topic: str, code: str, message: str) -> None:
        self.stats["unreadable"] += 1
        log.info("unreadable request", topic=topic, code=code, message=message)
        await self.publish_json(
            ERRORS_TOPIC, {"topic": topic, "error": {"code": code, "message": message}}
        )


def _parse_object(payload: bytes) -> dict[str, Any] | str:
    """The JSON object in a payload, or a string saying why there is none."""
    try:
        body = parse_json(payload)
    except BadJson as err:
        return str(err)
    if not isinstance(body, dict):
        return "not a JSON object"
    return body


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "request"
    return f"{where}: {first['msg']}"
