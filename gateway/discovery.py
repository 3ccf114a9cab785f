"""Zeroconf: advertise this gateway, browse for other gateways and MQTT brokers on the LAN.

The daemon advertises ``_store-gateway._tcp.local.`` (service port = the store broker's port; TXT
``store_id``, ``api=v1``, ``version``, ``broker_host``, ``broker_port``) and browses
``_store-gateway._tcp`` and ``_mqtt._tcp``. Another gateway announcing the SAME store id is logged
as an error once per sighting and shown in the health report (and ``gatewayctl status``) as
``discovery.state = "duplicate-store-id"`` with the offenders listed; the spec has no event type
for it, so no event is committed. The state clears when the other gateway leaves.

Zeroconf never takes the daemon down: no multicast, no interface or a refused socket degrade to
one warning and ``discovery.state = "unavailable"``. :class:`LanBrowser` is shared with
``gatewayctl devices discover``, which browses from its own process for a few seconds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import structlog
from zeroconf import Error as ZeroconfError
from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gateway import __version__

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger(__name__)

GATEWAY_TYPE = "_store-gateway._tcp.local."
MQTT_TYPE = "_mqtt._tcp.local."
API_VERSION = "v1"
RESOLVE_TIMEOUT_MS = 3000
#: What can go wrong with multicast sockets and mDNS names; all of it degrades to a warning.
ZEROCONF_FAILURES = (OSError, ZeroconfError, ValueError)

Interfaces = InterfaceChoice | Sequence[str]
Kind = Literal["gateway", "mqtt"]


@dataclass(frozen=True, slots=True)
class Sighting:
    """One resolved service seen on the LAN."""

    kind: Kind
    name: str
    host: str | None
    port: int | None
    addresses: tuple[str, ...]
    properties: Mapping[str, str | None] = field(default_factory=dict)
    seen_at: float = field(default_factory=time.time)

    @property
    def store_id(self) -> str | None:
        """The store id a gateway announces (None for brokers)."""
        return self.properties.get("store_id")

    def as_dict(self) -> dict[str, Any]:
        """JSON form (``gatewayctl devices discover --json``, the ``discovery.list`` action)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "addresses": list(self.addresses),
            "store_id": self.store_id,
            "version": self.properties.get("version"),
            "properties": dict(self.properties),
        }


class _Closing(Exception):
    """Raised in the TaskGroup body on stop so that pending resolutions are cancelled."""


class LanBrowser:
    """Browses gateways and MQTT brokers and keeps the resolved set until stopped."""

    def __init__(
        self,
        aiozc: AsyncZeroconf,
        *,
        on_change: Callable[[Sighting, bool], None] | None = None,
        resolve_timeout_ms: int = RESOLVE_TIMEOUT_MS,
    ) -> None:
        self._aiozc = aiozc
        self._on_change = on_change
        self._resolve_timeout_ms = resolve_timeout_ms
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self.sightings: dict[str, Sighting] = {}

    async def run(self) -> None:
        """Browse until :meth:`request_stop`; resolutions still running then are cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                browser = AsyncServiceBrowser(
                    self._aiozc.zeroconf, [GATEWAY_TYPE, MQTT_TYPE], handlers=[self._changed]
                )
                try:
                    await self._stop.wait()
                finally:
                    self._tg = None
                    await browser.async_cancel()
                raise _Closing
        except* _Closing:
            pass

    def request_stop(self) -> None:
        """End :meth:`run`."""
        self._stop.set()

    def _changed(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Browser callback (on the event loop): resolve additions, forget removals."""
        if state_change is ServiceStateChange.Removed:
            gone = self.sightings.pop(name, None)
            if gone is not None and self._on_change is not None:
                self._on_change(gone, False)
        elif self._tg is not None:
            self._tg.create_task(self._resolve(service_type, name), name="zeroconf-resolve")

    async def _resolve(self, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        try:
            found = await info.async_request(self._aiozc.zeroconf, self._resolve_timeout_ms)
        except ZEROCONF_FAILURES as err:
            log.debug("zeroconf resolution failed", name=name, error=str(err))
            return
        if not found:
            log.debug("zeroconf service did not resolve", name=name)
            return
        kind: Kind = "gateway" if service_type == GATEWAY_TYPE else "mqtt"
        sighting = Sighting(
            kind=kind,
            name=name,
            host=info.server,
            port=info.port,
            addresses=tuple(info.parsed_addresses()),
            properties=dict(info.decoded_properties),
        )
        self.sightings[name] = sighting
        if self._on_change is not None:
            self._on_change(sighting, True)


def open_zeroconf(interfaces: Interfaces = InterfaceChoice.All) -> AsyncZeroconf:
    """An AsyncZeroconf on ``interfaces`` (IPv4); raises one of :data:`ZEROCONF_FAILURES`."""
    return AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)


# --- the daemon's advertiser and watcher ------------------------------------------------------


class Discovery:
    """Advertise this gateway and watch the LAN (a Component); see the module docstring."""

    def __init__(
        self,
        *,
        store_id: str,
        broker_host: str,
        broker_port: int,
        instance: str | None = None,
        addresses: Sequence[str] | None = None,
        interfaces: Interfaces = InterfaceChoice.All,
    ) -> None:
        self.store_id = store_id
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.interfaces = interfaces
        self._instance = instance or _instance_name(store_id)
        self._addresses = list(addresses) if addresses is not None else _lan_addresses(broker_host)
        self._stop = asyncio.Event()
        self._browser: LanBrowser | None = None
        self.advertised: str | None = None
        self.state: Literal["starting", "ok", "unavailable", "duplicate-store-id"] = "starting"
        self.problem: str | None = None
        self.duplicates: dict[str, Sighting] = {}
        self._change = asyncio.Event()

    async def run(self) -> None:
        """Advertise and browse until stopped; zeroconf failures only warn."""
        try:
            aiozc = open_zeroconf(self.interfaces)
        except ZEROCONF_FAILURES as err:
            self._unavailable(err)
            await self._stop.wait()
            return
        try:
            await self._advertise(aiozc)
            self._browser = LanBrowser(aiozc, on_change=self._seen)
            if self._stop.is_set():
                return
            await self._browser.run()
        finally:
            self._browser = None
            await self._close(aiozc)

    def request_stop(self) -> None:
        """Withdraw the advertisement and stop browsing."""
        self._stop.set()
        if self._browser is not None:
            self._browser.request_stop()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds (checked again after every change)."""
        while not predicate():
            await self._change.wait()

    def _notify(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    def sightings(self) -> list[Sighting]:
        """What the browser currently sees (empty when zeroconf is unavailable)."""
        return list(self._browser.sightings.values()) if self._browser else []

    def health(self) -> dict[str, Any]:
        """The ``discovery`` entry of the health report."""
        seen = self.sightings()
        return {
            "discovery": {
                "state": self.state,
                "advertised": self.advertised,
                "other_gateways": sum(
                    1 for s in seen if s.kind == "gateway" and s.name != self.advertised
                ),
                "brokers": sum(1 for s in seen if s.kind == "mqtt"),
                "duplicates": [_brief(s) for s in self.duplicates.values()],
                "detail": self.problem,
            }
        }

    async def list_action(self, _args: dict[str, Any], _uid: int) -> dict[str, Any]:
        """The ``discovery.list`` control action: this gateway's advertisement and sightings."""
        return {
            "advertised": self.advertised,
            "state": self.state,
            "sightings": [s.as_dict() for s in self.sightings()],
        }

    async def _advertise(self, aiozc: AsyncZeroconf) -> None:
        info = AsyncServiceInfo(
            GATEWAY_TYPE,
            f"{self._instance}.{GATEWAY_TYPE}",
            port=self.broker_port,
            properties={
                "store_id": self.store_id,
                "api": API_VERSION,
                "version": __version__,
                "broker_host": self.broker_host,
                "broker_port": str(self.broker_port),
            },
            server=f"{_hostname()}.local.",
            parsed_addresses=self._addresses,
        )
        try:
            await (await aiozc.async_register_service(info, allow_name_change=True))
        except ZEROCONF_FAILURES as err:
            self._unavailable(err)
            return
        self.advertised = info.name
        if self.state == "starting":
            self.state = "ok"
        self._notify()
        log.info("zeroconf advertised", name=info.name, addresses=self._addresses)

    def _seen(self, sighting: Sighting, present: bool) -> None:
        if sighting.kind != "gateway" or sighting.name == self.advertised:
            self._notify()
            return
        if sighting.store_id != self.store_id:
            self.duplicates.pop(sighting.name, None)
        elif present and sighting.name not in self.duplicates:
            self.duplicates[sighting.name] = sighting
            log.error(
                "another gateway advertises this store id", ours=self.advertised, **_brief(sighting)
            )
        elif not present and self.duplicates.pop(sighting.name, None) is not None:
            log.info("the other gateway with this store id left", name=sighting.name)
        if self.state in ("ok", "duplicate-store-id"):
            self.state = "duplicate-store-id" if self.duplicates else "ok"
        self._notify()

    def _unavailable(self, err: BaseException) -> None:
        self.state = "unavailable"
        self.problem = f"{type(err).__name__}: {err}"
        self._notify()
        log.warning("zeroconf unavailable; not advertised, not browsing", error=self.problem)

    async def _close(self, aiozc: AsyncZeroconf) -> None:
        try:
            await aiozc.async_close()
        except ZEROCONF_FAILURES as err:
            log.warning("zeroconf did not close cleanly", error=str(err))


def _brief(sighting: Sighting) -> dict[str, Any]:
    return {
        "name": sighting.name,
        "host": sighting.host,
        "addresses": list(sighting.addresses),
        "store_id": sighting.store_id,
    }


def _hostname() -> str:
    return socket.gethostname().split(".")[0] or "store-gateway"


def _instance_name(store_id: str) -> str:
    """``store-0042 on pi-7`` (mDNS instance names stop at 63 bytes)."""
    return f"{store_id} on {_hostname()}".encode()[:63].decode(errors="ignore")


def _lan_addresses(broker_host: str) -> list[str]:
    """The address tills should use: the broker's own if it is a LAN IP, else ours toward mDNS."""
    try:
        ip = ipaddress.ip_address(broker_host)
    except ValueError:
        ip = None
    if ip is not None and ip.version == 4 and not (ip.is_loopback or ip.is_unspecified):
        return [str(ip)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("224.0.0.251", 5353))  # no packet is sent; the kernel picks a source
            return [str(probe.getsockname()[0])]
        except OSError:
            return []


async def install(gw: Gateway, _stack: AsyncExitStack) -> None:
    """Advertise and browse when ``discovery.enabled``."""
    cfg = gw.config
    if not cfg.discovery.enabled:
        return
    discovery = Discovery(
        store_id=cfg.store.id,
        broker_host=cfg.discovery.advertise_host or cfg.store_bus.host,
        broker_port=cfg.store_bus.port,
    )
    gw.extra_health.append(discovery.health)
    gw.actions["discovery.list"] = discovery.list_action
    from gateway.app import Supervised  # noqa: PLC0415 - keeps gatewayctl's imports light

    gw.components.append(Supervised("discovery", discovery))
