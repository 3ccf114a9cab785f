"""One MQTT link kept alive: connect, subscribe, birth, serve, reconnect with backoff.

Both the cloud link and the store-bus link are an :class:`MqttLink` (aiomqtt 2.x on paho). On
every connect it subscribes first, then publishes the retained birth message, then runs the
owner's session coroutine beside the receive loop; any connection error ends the session, the
link backs off (capped, jittered) and starts over. ``request_stop`` publishes the goodbye and
disconnects. A refused login is logged as an error and retried at the longest backoff only.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.backoff import Backoff
from gateway.clock import monotonic_s, now_rfc3339
from gateway.config import MqttSection, read_secret
from gateway.errors import LinkUnavailable
from gateway.linkstate import LinkState, StateCell

log = structlog.get_logger(__name__)

_AUTH_CODES = frozenset({4, 5, 0x86, 0x87})  # 3.1.1 bad credentials/not authorised; v5 same
# A refused TLS handshake (certificate, host name, protocol version, client certificate) is a
# configuration problem, not an outage: aiomqtt passes only the OpenSSL text, so match on it.
_TLS_REFUSED = re.compile(
    r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|Hostname mismatch|"
    r"ALERT_(BAD|UNKNOWN|UNSUPPORTED|EXPIRED|REVOKED)?_?CERTIFICATE|CERTIFICATE_REQUIRED|"
    r"HANDSHAKE_FAILURE|PROTOCOL_VERSION|UNSUPPORTED_PROTOCOL|WRONG_VERSION_NUMBER|"
    r"NO_PROTOCOLS_AVAILABLE|UNKNOWN_CA",
    re.IGNORECASE,
)
SESSION_EXPIRY_S = 86400


@dataclass(frozen=True, slots=True)
class Inbound:
    """A received message, decoupled from the client library."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message to publish (birth, will, goodbye)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


Handler = Callable[[Inbound], Awaitable[None]]
Session = Callable[[aiomqtt.Client], Coroutine[Any, Any, None]]


class _StopSession(Exception):
    """Raised inside the session TaskGroup to end it on request_stop."""


class MqttLink:
    """A self-healing MQTT connection with birth/will/goodbye and a dispatch callback."""

    def __init__(
        self,
        name: str,
        settings: MqttSection,
        *,
        client_id: str,
        subscriptions: Sequence[str],
        on_message: Handler,
        will: Outbound | None = None,
        birth: Callable[[], Outbound] | None = None,
        goodbye: Callable[[], Outbound] | None = None,
        session: Session | None = None,
        concurrency: int = 1,
    ) -> None:
        self.name = name
        self.settings = settings
        self.client_id = client_id
        self.subscriptions = tuple(subscriptions)
        self.on_message = on_message
        self.will = will
        self.birth = birth
        self.goodbye = goodbye
        self.session = session
        self.state = StateCell(name, LinkState.DISCONNECTED)
        self.connected_since: float | None = None
        self.connected_since_wall: str | None = None
        self.backoff = Backoff(initial_s=settings.backoff_initial_s, max_s=settings.backoff_max_s)
        self._client: aiomqtt.Client | None = None
        self._stop = asyncio.Event()
        self._concurrency = asyncio.Semaphore(concurrency)
        self._sequential = concurrency == 1
        self._log = log.bind(link=name)
        self._outage_logged = False

    # --- public surface -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a session is up."""
        return self.state.value == LinkState.CONNECTED

    def request_stop(self) -> None:
        """Publish the goodbye and disconnect; :meth:`run` then returns."""
        self._stop.set()
        self.backoff.wake()

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish on the current session; LinkUnavailable when there is none or it fails."""
        client = self._client
        if client is None or not self.connected:
            raise LinkUnavailable(f"{self.name} link is not connected")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=self._op_timeout_s)
        except aiomqtt.MqttError as err:
            raise LinkUnavailable(f"{self.name} publish failed: {err}") from err

    async def run(self) -> None:
        """Keep the link up until :meth:`request_stop`."""
        while not self._stop.is_set():
            self.state.set(LinkState.CONNECTING)
            try:
                await self._connect_and_serve()
            except* _StopSession:
                pass
            except* aiomqtt.MqttError as group:
                self._on_link_error(group.exceptions[0])
            finally:
                self._client = None
                self.connected_since = None
                self.connected_since_wall = None
                self.state.set(LinkState.DISCONNECTED)
            if self._stop.is_set():
                return
            await self.backoff.wait()

    def _on_link_error(self, err: BaseException) -> None:
        auth = isinstance(err, aiomqtt.MqttCodeError) and _rc_value(err.rc) in _AUTH_CODES
        if auth:
            self._log.error(
                "broker refused our credentials; check username and password_file", error=str(err)
            )
            self.backoff.exhaust()
        elif _TLS_REFUSED.search(str(err)):
            self._log.error(
                "TLS handshake refused; check ca_file, cert_file/key_file and the broker's "
                "certificate (host name, validity, TLS >= 1.2)",
                error=str(err),
            )
            self.backoff.exhaust()
        elif not self._outage_logged:
            self._log.warning("link down; retrying with backoff", error=str(err))
        self._outage_logged = True

    # --- internals ----------------------------------------------------------------------------

    @property
    def _op_timeout_s(self) -> float:
        return float(self.settings.keepalive_s * 2)

    def _client_kwargs(self) -> dict[str, Any]:
        s = self.settings
        v5 = s.protocol == "5"
        kwargs: dict[str, Any] = {
            "hostname": s.host,
            "port": s.port,
            "identifier": self.client_id,
            "protocol": aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            # paho pings after `keepalive` idle and gives up one more `keepalive` later; 3/4 of
            # the configured value detects a half-open link within ~1.5x keepalive_s.
            "keepalive": max(2, math.ceil(s.keepalive_s * 0.75)),
            "timeout": s.connect_timeout_s,
            "max_inflight_messages": 0,  # unlimited in paho: the application caps its window
            "max_queued_incoming_messages": 10000,
            # request/reply over QoS 1: without it Nagle meets delayed ACKs (~40 ms per hop)
            "socket_options": ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        }
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            kwargs["properties"] = props
            kwargs["clean_start"] = False
        else:
            kwargs["clean_session"] = False
        if s.username is not None:
            kwargs["username"] = s.username
            kwargs["password"] = read_secret(s.password_file) if s.password_file else None
        if s.tls:
            kwargs["tls_context"] = make_tls_context(s)
        if self.will is not None:
            kwargs["will"] = aiomqtt.Will(
                self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain
            )
        return kwargs

    async def _connect_and_serve(self) -> None:
        client = aiomqtt.Client(**self._client_kwargs())
        # Many publishes awaiting PUBACK is our design (the drain window), not a symptom.
        client.pending_calls_threshold = 100_000
        async with client:
            for topic in self.subscriptions:
                await client.subscribe(topic, qos=1, timeout=self._op_timeout_s)
            if self.birth is not None:
                b = self.birth()
                await client.publish(
                    b.topic, b.payload, qos=b.qos, retain=b.retain, timeout=self._op_timeout_s
                )
            self._client = client
            self.connected_since = monotonic_s()
            self.connected_since_wall = now_rfc3339()
            self.state.set(LinkState.CONNECTED)
            self.backoff.reset()
            self._outage_logged = False
            self._log.info("link up", host=self.settings.host, port=self.settings.port)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(client, tg), name=f"{self.name}-receive")
                if self.session is not None:
                    tg.create_task(self.session(client), name=f"{self.name}-session")
                tg.create_task(self._wait_stop(client), name=f"{self.name}-stop")

    async def _wait_stop(self, client: aiomqtt.Client) -> None:
        await self._stop.wait()
        if self.goodbye is not None:
            g = self.goodbye()
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(g.topic, g.payload, qos=g.qos, retain=g.retain, timeout=5)
        raise _StopSession

    async def _receive(self, client: aiomqtt.Client, tg: asyncio.TaskGroup) -> None:
        async for message in client.messages:
            inbound = Inbound(
                topic=str(message.topic),
                payload=_payload_bytes(message.payload),
                retain=bool(message.retain),
            )
            if self._sequential:
                await self._dispatch(inbound)
            else:
                await self._concurrency.acquire()  # backpressure: stop reading when saturated
                tg.create_task(self._dispatch_released(inbound))

    async def _dispatch_released(self, inbound: Inbound) -> None:
        try:
            await self._dispatch(inbound)
        finally:
            self._concurrency.release()

    async def _dispatch(self, inbound: Inbound) -> None:
        try:
            await self.on_message(inbound)
        except LinkUnavailable as err:
            self._log.warning("reply not sent; link went down", topic=inbound.topic, error=str(err))
        except Exception:  # noqa: BLE001 - the edge: one bad message must not end the link
            self._log.exception("handler failed", topic=inbound.topic)


def _payload_bytes(payload: Any) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return b"" if payload is None else str(payload).encode()


def _rc_value(rc: Any) -> int | None:
    if isinstance(rc, int):
        return rc
    value = getattr(rc, "value", None)
    return value if isinstance(value, int) else None


def make_tls_context(settings: MqttSection) -> ssl.SSLContext:
    """A verifying TLS ≥ 1.2 context (CA, optional client cert); there is no insecure variant."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(settings.ca_file) if settings.ca_file else None
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if settings.cert_file is not None and settings.key_file is not None:
        ctx.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    return ctx


__all__ = ["Inbound", "MqttLink", "Outbound", "make_tls_context"]
