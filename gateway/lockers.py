"""Click-and-collect lockers: staff loading, customer pickup, retrieval, remote and test openings.

Store-bus requests ``store/v1/lockers/{bank}/load|pickup|retrieve`` (store-api.md), the cloud
command ``locker.open``, the retained ``store/v1/lockers/{bank}/state`` and the locker events of
cloud-api.md. Every state change commits together with its outbox event.

:class:`LockerService` composes the parts and supervises their loops:

- ``gateway.locker_openings``: audited lock pulses (``locker_actions``), ``locker.open`` and the
  technician's test opening, and the start-up report of pulses whose outcome a crash lost;
- ``gateway.locker_requests``: load, pickup and retrieve with their stored first answers;
- ``gateway.locker_state``: retained bank state, ``device.status`` and ``locker.alert``.

All mutations run under one lock (a store has few banks and few openings a minute); the door
wait of a load runs outside it, in a task owned by :meth:`LockerService.run`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from devices.locker import LockerBank, LockerBankSettings
from gateway import pickup_codes as codes
from gateway.commands import Command, CommandSpec, Outcome
from gateway.config import LockersSection
from gateway.locker_openings import (
    OpenData,
    Openings,
    OpenResult,
    UnknownCompartment,
    report_lost_outcomes,
)
from gateway.locker_requests import LockerRequests
from gateway.locker_state import BankStates
from gateway.orders import CancelData, CreateData, OrderService

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["LockerService", "OpenResult", "UnknownCompartment", "install", "locker_service"]


class LockerService:
    """Owns the banks' drivers, the locker routes and commands, and their background loops."""

    def __init__(
        self,
        gw: Gateway,
        banks: Sequence[LockerBankSettings],
        rules: LockersSection,
        *,
        now: Callable[[], float] = time.time,
        hash_params: codes.ScryptParams = codes.DEFAULT_PARAMS,
    ) -> None:
        self.gw = gw
        self.db = gw.db
        self.lock = asyncio.Lock()
        self.settings = {b.id: b for b in banks}
        self.banks: dict[str, LockerBank] = {}
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self.states = BankStates(
            self.db, gw.store_bus, self.banks, set(self.settings), gw.device_status
        )
        self.mark_dirty = self.states.mark_dirty
        self.orders = OrderService(
            self.db, gw.inventory, gw.clock, self.lock, self.mark_dirty, now=now
        )
        self.openings = Openings(self.db, self.banks, self.lock, self._ready, self.mark_dirty)
        self.requests = LockerRequests(
            gw,
            self.openings,
            rules,
            lock=self.lock,
            ready=self._ready,
            mark_dirty=self.mark_dirty,
            spawn=self._spawn,
            now=now,
            hash_params=hash_params,
        )

    async def open(self, stack: AsyncExitStack) -> None:
        """Enter every bank's driver on the stack and load the keypad states."""
        for settings in self.settings.values():
            bank = LockerBank(settings, self.states.on_locker_event)
            self.banks[settings.id] = await stack.enter_async_context(bank)
            bank.add_state_listener(lambda _n, _v: self.states.status_changed())
        await self.requests.load_keypads()
        self.gw.store_bus.link.state.listeners.append(self.states.on_store_bus_state)

    def register(self) -> None:
        """Add the store-bus routes and the cloud commands."""
        for route in self.requests.routes():
            self.gw.store_bus.add_route(route)
        reg = self.gw.dispatcher.register
        reg("order.pickup.create", CommandSpec(self._cmd(self.orders.create), CreateData))
        reg("order.pickup.cancel", CommandSpec(self._cmd(self.orders.cancel), CancelData))
        reg("locker.open", CommandSpec(self.openings.remote_open, OpenData, physical=True))

    def _cmd(
        self, handler: Callable[[Command, Any], Awaitable[Outcome]]
    ) -> Callable[[Command, Any], Awaitable[Outcome]]:
        async def run(cmd: Command, data: Any) -> Outcome:
            await self._ready.wait()
            return await handler(cmd, data)

        return run

    def health(self) -> dict[str, Any]:
        """The banks for the health report."""
        return {
            "devices": [
                {"device_id": b, "kind": "locker", "state": bank.state.value}
                for b, bank in self.banks.items()
            ]
        }

    async def run(self) -> None:
        """Report lost outcomes and prune old answers, then run the drivers, publisher and timers."""
        await report_lost_outcomes(self.db)
        await self.requests.prune()  # before any request can read a stored answer
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for bank_id, bank in self.banks.items():
                    tg.create_task(bank.run(), name=f"locker-bank-{bank_id}")
                tg.create_task(self.states.publish_loop(), name="locker-state")
                tg.create_task(self.states.status_loop(), name="locker-status")
                tg.create_task(self.orders.run_expiry(), name="order-expiry")
                tg.create_task(self.requests.run_pruning(), name="locker-requests-prune")
                self._ready.set()
                await self._stop.wait()
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            self._tg = None

    def request_stop(self) -> None:
        """Stop the loops (a load still waiting for its door is reported at the next start)."""
        self._stop.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        assert self._tg is not None
        self._tg.create_task(coro, name=name)

    async def state_of(self, bank_id: str) -> dict[str, Any]:
        """The retained state body of one bank."""
        return await self.states.state_of(bank_id)

    async def technician_open(self, bank: str, compartment: int, uid: int) -> OpenResult:
        """A technician's test opening (control socket); an out-of-order empty one returns to use."""
        return await self.openings.technician_open(bank, compartment, uid)

    async def action_open(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """Control-socket action ``locker.open`` {bank, compartment}: a technician test pulse."""
        return await self.openings.action_open(args, uid)


class _Stopped(Exception):
    """Ends the service's TaskGroup on request_stop."""


async def install(gw: Gateway, stack: AsyncExitStack) -> None:
    """Installer (gateway.services): banks, routes, commands, the supervised loop, health."""
    from gateway.app import Supervised  # noqa: PLC0415 - app imports the service registry

    service = LockerService(gw, gw.config.locker_banks, gw.config.lockers)
    await service.open(stack)
    service.register()
    gw.actions["locker.open"] = service.action_open
    gw.components.append(Supervised("lockers", service))
    gw.extra_health.append(service.health)


def locker_service(gw: Gateway) -> LockerService:
    """The gateway's locker service (for the control socket); LookupError when not installed."""
    for supervised in gw.components:
        if isinstance(supervised.component, LockerService):
            return supervised.component
    raise LookupError("the locker service is not installed")
