"""What the locker banks tell the world: retained state, device status and alerts.

The retained ``store/v1/lockers/{bank}/state`` (store-api.md) is republished whenever a bank is
marked dirty and again on every store-bus reconnect; a bank's link state becomes a
``device.status`` event once per change; driver alerts (forced open, left open, …) become
``locker.alert`` events (cloud-api.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from devices.locker import LockerBank, LockerEvent, LockerEventKind
from gateway.db import Database, Work
from gateway.errors import LinkUnavailable, StorageError
from gateway.linkstate import LinkState
from gateway.orders import CompartmentState, OrderStore
from gateway.storebus import StoreBus

log = structlog.get_logger(__name__)

State = CompartmentState
DeviceStatus = Callable[[str, str, str], Awaitable[None]]

_WIRE = {
    State.FREE: "free",
    State.LOADING: "reserved",
    State.OCCUPIED: "occupied",
    State.RETRIEVE: "occupied",
    State.OUT_OF_ORDER: "out_of_order",
}


class BankStates:
    """Publishes each bank's retained state and reports its status and alerts."""

    def __init__(
        self,
        db: Database,
        bus: StoreBus,
        banks: dict[str, LockerBank],
        bank_ids: set[str],
        device_status: DeviceStatus,
    ) -> None:
        self.db = db
        self.bus = bus
        self.banks = banks  # filled by the service as it enters the drivers
        self.store = OrderStore(db)
        self._bank_ids = bank_ids
        self._device_status = device_status
        self._dirty: set[str] = set(bank_ids)
        self._publish = asyncio.Event()
        self._status = asyncio.Event()

    def mark_dirty(self, bank: str) -> None:
        """Republish ``bank``'s retained state soon."""
        self._dirty.add(bank)
        self._publish.set()

    def status_changed(self) -> None:
        """Compare the banks' link states with the last reported ones soon."""
        self._status.set()

    def on_store_bus_state(self, _name: str, value: str) -> None:
        """Store-bus link listener: a reconnect republishes every bank."""
        if value == LinkState.CONNECTED:
            for bank in self._bank_ids:
                self.mark_dirty(bank)

    async def on_locker_event(self, event: LockerEvent) -> None:
        """Driver callback: republish, report board changes, record alerts."""
        self.mark_dirty(event.bank)
        if event.kind in (LockerEventKind.BOARD_OFFLINE, LockerEventKind.BOARD_ONLINE):
            self._status.set()
        if not event.is_alert:
            return
        await self._alert(event.bank, event.kind.value, event.compartment)

    async def _alert(self, bank: str, alert: str, compartment: int | None) -> None:
        data: dict[str, Any] = {"bank": bank, "alert": alert}
        if compartment is not None:
            data["compartment"] = compartment
        log.warning("locker alert", bank=bank, alert=alert, compartment=compartment)
        try:
            await self.db.submit(
                Work(events=[self.db.draft("locker.alert", data)], refusable=False)
            )
        except StorageError as err:  # the driver's poll loop must go on
            log.error("locker alert not recorded", bank=bank, alert=alert, error=str(err))

    async def status_loop(self) -> None:
        """Commit a ``device.status`` for every change of a bank's link state."""
        reported: dict[str, str] = {}
        while True:
            await self._status.wait()
            self._status.clear()
            for bank_id, bank in self.banks.items():
                state = bank.state.value
                if reported.get(bank_id) == state:
                    continue
                self.mark_dirty(bank_id)
                try:
                    await self._device_status(bank_id, "locker", state)
                except StorageError as err:
                    log.error("device.status not recorded", bank=bank_id, error=str(err))
                    continue
                reported[bank_id] = state

    async def publish_loop(self) -> None:
        """Publish the retained state of every dirty bank; a bank not sent stays dirty."""
        self._publish.set()
        while True:
            await self._publish.wait()
            self._publish.clear()
            dirty, self._dirty = self._dirty, set()
            for bank in sorted(dirty):
                body = await self.state_of(bank)
                try:
                    await self.bus.publish_json(f"store/v1/lockers/{bank}/state", body, retain=True)
                except LinkUnavailable:
                    self._dirty.add(bank)  # sent again when the store bus reconnects
                _raise_if_cancelling()

    async def state_of(self, bank_id: str) -> dict[str, Any]:
        """The retained state body of one bank."""
        bank = self.banks[bank_id]
        recorded = await self.store.compartments(bank_id)
        out = []
        for c in bank.settings.compartments:
            door = bank.door_open(c.number)
            state = _WIRE[recorded.get(c.number, (State.FREE, None))[0]]
            if door is None:
                state = "out_of_order"
            elif door:
                state = "open"
            out.append({"number": c.number, "size": c.size, "state": state})
        return {"compartments": out}


def _raise_if_cancelling() -> None:
    """Re-raise a cancel that Python 3.11's ``asyncio.wait_for`` (inside aiomqtt) dropped.

    When a PUBACK and a cancel arrive together, 3.11's ``wait_for`` returns the result and the
    cancel is lost; the task is still marked as cancelling, so honour that here.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
