"""The composition root: configuration → resources on one AsyncExitStack → one TaskGroup.

Start order: database (with its writer task), services, cloud link, store bus, maintenance,
watchdog; READY=1 once all are started. Stop (SIGTERM/SIGINT): STOPPING=1, then the links say
goodbye and disconnect (store bus first, then cloud), then the writer commits what is queued,
then the resources close in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from gateway.clock import ClockStatus, new_boot_id, now_rfc3339
from gateway.cloud import CloudLink
from gateway.commands import CommandDispatcher
from gateway.config import GatewayConfig
from gateway.db import Database, Work
from gateway.inventory import Inventory
from gateway.lifecycle import EarlyStop
from gateway.outbox import Outbox
from gateway.sdnotify import SdNotifier
from gateway.services import installers
from gateway.storebus import StoreBus

log = structlog.get_logger(__name__)

MAINTENANCE_INTERVAL_S = 30.0


Action = Callable[[dict[str, Any], int], Awaitable[dict[str, Any]]]


class Component(Protocol):
    """A long-lived loop the supervisor runs and stops."""

    async def run(self) -> None: ...

    def request_stop(self) -> None: ...


@dataclass(slots=True)
class Supervised:
    """A component with its task name, in start order."""

    name: str
    component: Component


@dataclass(slots=True)
class Gateway:
    """The running daemon: every part, wired once."""

    config: GatewayConfig
    notifier: SdNotifier = field(default_factory=SdNotifier)
    config_path: str | None = None
    boot_id: str = field(default_factory=new_boot_id)
    started_at: float = field(default_factory=time.time)
    clock: ClockStatus = field(init=False)
    db: Database = field(init=False)
    outbox: Outbox = field(init=False)
    inventory: Inventory = field(init=False)
    dispatcher: CommandDispatcher = field(init=False)
    cloud: CloudLink = field(init=False)
    store_bus: StoreBus = field(init=False)
    components: list[Supervised] = field(default_factory=list)
    extra_health: list[Callable[[], dict[str, Any]]] = field(default_factory=list)
    # Technician actions served by the control socket: name → handler(args, peer uid) → reply.
    actions: dict[str, Action] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def build(self, stack: AsyncExitStack) -> None:
        """Create every resource on the stack (reverse order on exit)."""
        cfg = self.config
        self.clock = ClockStatus(cfg.clock.synced)
        self.db = await stack.enter_async_context(
            Database(
                cfg.storage.path,
                store_id=cfg.store.id,
                boot_id=self.boot_id,
                clock=self.clock,
                max_bytes=cfg.storage.max_bytes,
                min_free_bytes=cfg.storage.min_free_bytes,
                warn_fraction=cfg.storage.warn_fraction,
                commit_max_rows=cfg.storage.commit_max_rows,
            )
        )
        self.outbox = Outbox(self.db)
        await self.outbox.load()
        self.inventory = Inventory(self.db, stale_after_s=cfg.inventory.stale_after_s)
        await self.inventory.load()
        self.dispatcher = CommandDispatcher(self.db, cfg.security, self.clock)
        self.cloud = CloudLink(
            cfg.cloud,
            store_id=cfg.store.id,
            boot_id=self.boot_id,
            db=self.db,
            outbox=self.outbox,
            dispatcher=self.dispatcher,
            health=self.health,
        )
        self.store_bus = StoreBus(
            cfg.store_bus,
            store_id=cfg.store.id,
            boot_id=self.boot_id,
            cloud_state=self.cloud.link.state,
        )
        self.components = [
            Supervised("cloud-link", self.cloud),
            Supervised("store-bus", self.store_bus),
        ]
        for install in installers():
            await install(self, stack)

    async def device_status(
        self, device_id: str, kind: str, state: str, detail: str | None = None
    ) -> None:
        """Commit a ``device.status`` event (bookkeeping: never refused for size)."""
        data: dict[str, Any] = {"device_id": device_id, "kind": kind, "state": state}
        if detail:
            data["detail"] = detail
        await self.db.submit(Work(events=[self.db.draft("device.status", data)], refusable=False))

    async def health(self) -> dict[str, Any]:
        """The cloud health message (also what ``gatewayctl status`` shows)."""
        stats = await self.outbox.stats()
        storage = self.db.health()
        link = self.cloud.link
        body: dict[str, Any] = {
            "at": now_rfc3339(),
            "boot_id": self.boot_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "outbox": stats.as_health(),
            "cloud": {
                "state": "connected" if link.connected else "disconnected",
                "connected_since": link.connected_since_wall,
            },
            "store_bus": {
                "state": "connected" if self.store_bus.link.connected else "disconnected"
            },
            "devices": [],
            "disk": {
                "free_bytes": storage.free_bytes,
                "db_bytes": storage.db_bytes,
                # beyond the spec's two fields: the bound, and an alert long before refusals
                "used_bytes": storage.used_bytes,
                "max_bytes": storage.max_bytes,
                "warning": storage.warning,
                "full": storage.full,
            },
            "clock": self.clock.label(),
        }
        for extra in self.extra_health:
            for key, value in extra().items():
                if isinstance(value, list) and isinstance(body.get(key), list):
                    body[key].extend(value)
                else:
                    body[key] = value
        return body

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        cloud = self.cloud.link.state.value
        pending = self.db.last_seq - max(self.outbox.sent_through, self.outbox.acked_through)
        return (
            f"cloud {cloud}, store bus {self.store_bus.link.state.value}, {pending} events pending"
        )

    def request_stop(self) -> None:
        """Begin a clean shutdown."""
        self._stop.set()

    async def serve(self) -> None:
        """Run every loop in one TaskGroup until a stop is requested, then stop in order."""
        async with asyncio.TaskGroup() as tg:
            writer = tg.create_task(self.db.run(), name="db-writer")
            tasks = [tg.create_task(s.component.run(), name=s.name) for s in self.components]
            maintenance = tg.create_task(self._maintenance(), name="maintenance")
            watchdog = tg.create_task(self._watchdog(), name="watchdog")
            self.notifier.ready()
            self.notifier.status(self.status_line())
            self.ready.set()
            log.info("ready", boot_id=self.boot_id, last_seq=self.db.last_seq)
            await self._stop.wait()
            self.notifier.stopping()
            log.info("stopping")
            for s, task in reversed(list(zip(self.components, tasks, strict=True))):
                s.component.request_stop()
                await task
            await self.outbox.persist()
            self.db.request_stop()
            await writer
            maintenance.cancel()
            watchdog.cancel()

    async def _maintenance(self) -> None:
        storage_cfg = self.config.storage
        warned = False
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)
            await self.db.refresh_usage()
            health = self.db.health()
            if health.warning or health.full:
                await self.outbox.prune(retention_s=storage_cfg.retention_s, force=True)
                if not warned:
                    log.warning(
                        "storage nearly full",
                        used_bytes=health.used_bytes,
                        max_bytes=health.max_bytes,
                        free_bytes=health.free_bytes,
                    )
                    warned = True
            else:
                warned = False
                await self.outbox.prune(retention_s=storage_cfg.retention_s)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_s()
        while True:
            self.notifier.watchdog()
            self.notifier.status(self.status_line())
            await asyncio.sleep(interval or 30.0)


async def run_gateway(
    config: GatewayConfig, *, notifier: SdNotifier | None = None, config_path: str | None = None
) -> None:
    """Build, serve until SIGTERM/SIGINT, shut down cleanly."""
    gateway = Gateway(config, notifier=notifier or SdNotifier(), config_path=config_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, gateway.request_stop)
    if EarlyStop.requested:
        gateway.request_stop()
    try:
        async with AsyncExitStack() as stack:
            await gateway.build(stack)
            await gateway.serve()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    log.info("stopped cleanly")
