"""Click-and-collect orders: the cloud commands that create and cancel them, and expiry.

``order.pickup.create`` reserves the order's stock through the inventory (the order row, the
reservation and ``order.updated accepted`` in one unit of work); a SKU the inventory does not
know rejects the order (``order.updated rejected``, committed with the command result).
``order.pickup.cancel`` releases the reservation; a parcel already in a locker leaves its
compartment waiting for staff retrieval. Orders not collected by ``pickup_by`` expire (judged
only while the clock is synchronised); the timer sleeps until the next deadline or a change.

Both commands are idempotent by ``order_id`` as well as by command id, so a command whose
result was lost in a crash has no second effect when the cloud sends it again.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.clock import ClockStatus, parse_rfc3339
from gateway.commands import Command, Outcome
from gateway.db import Database, EventDraft, SeqOf, Statement
from gateway.inventory import Inventory, Reservation
from gateway.pickup_codes import CodeHash

log = structlog.get_logger(__name__)

SIZES = ("S", "M", "L")
MAX_TIMER_S = 60.0  # re-read the deadline at least this often: NTP may step the wall clock


class OrderStatus(enum.StrEnum):
    """Order states; the values are the wire words of ``order.updated``."""

    ACCEPTED = "accepted"
    IN_LOCKER = "in_locker"
    COLLECTED = "collected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


class CompartmentState(enum.StrEnum):
    """Occupancy of a compartment as recorded (door state comes from the driver)."""

    FREE = "free"
    LOADING = "loading"  # staff is loading a parcel: assigned, door not yet closed
    OCCUPIED = "occupied"  # a parcel waiting for its customer
    RETRIEVE = "retrieve"  # a parcel of an expired or cancelled order: staff must empty it
    OUT_OF_ORDER = "out_of_order"  # jammed, or a pulse whose outcome was lost in a crash


# --- inbound command data (the edge) --------------------------------------------------------


class _Data(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class OrderItem(_Data):
    """One order line."""

    sku: str = Field(min_length=1, max_length=64)
    qty: int = Field(ge=1, le=100_000)


class CreateData(_Data):
    """``order.pickup.create`` data."""

    order_id: str = Field(min_length=1, max_length=64)
    items: list[OrderItem] = Field(min_length=1, max_length=500)
    size: Literal["S", "M", "L"]
    pickup_by: str
    customer_ref: str | None = Field(default=None, max_length=128)

    @field_validator("pickup_by")
    @classmethod
    def _check_time(cls, value: str) -> str:
        parse_rfc3339(value)
        return value

    @field_validator("items")
    @classmethod
    def _check_unique(cls, items: list[OrderItem]) -> list[OrderItem]:
        skus = [i.sku for i in items]
        if len(set(skus)) != len(skus):
            raise ValueError("each sku may appear only once")
        return items


class CancelData(_Data):
    """``order.pickup.cancel`` data."""

    order_id: str = Field(min_length=1, max_length=64)


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Order:
    """One order as committed."""

    order_id: str
    status: OrderStatus
    size: str
    items: tuple[tuple[str, int], ...]
    pickup_by: float
    bank: str | None
    compartment: int | None
    code_hash: CodeHash | None

    @property
    def reservation(self) -> Reservation:
        """The stock this order holds (or held)."""
        return Reservation(self.order_id, self.items)


# The column list of _order(), spelled out in each query (no SQL is built from strings).


def _order(row: Sequence[Any]) -> Order:
    items = tuple((str(s), int(q)) for s, q in json.loads(row[3]))
    code = CodeHash.decode(row[7]) if row[7] else None
    compartment = int(row[6]) if row[6] is not None else None
    return Order(
        str(row[0]),
        OrderStatus(row[1]),
        str(row[2]),
        items,
        float(row[4]),
        row[5],
        compartment,
        code,
    )


class OrderStore:
    """Reads of the orders and compartments tables (committed data) and statement builders."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, order_id: str) -> Order | None:
        """One order, or None."""
        row = await self.db.fetchone(
            "SELECT order_id, status, size, items, pickup_by, bank, compartment, code_hash "
            "FROM orders WHERE order_id = ?",
            (order_id,),
        )
        return _order(row) if row else None

    async def with_codes(self, bank: str) -> list[Order]:
        """Orders at ``bank`` whose code is still on file (in the locker or expired there)."""
        rows = await self.db.fetchall(
            "SELECT order_id, status, size, items, pickup_by, bank, compartment, code_hash "
            "FROM orders WHERE bank = ? AND code_hash IS NOT NULL",
            (bank,),
        )
        return [_order(r) for r in rows]

    async def due(self, now: float) -> list[Order]:
        """Open orders whose ``pickup_by`` has passed."""
        rows = await self.db.fetchall(
            "SELECT order_id, status, size, items, pickup_by, bank, compartment, code_hash "
            "FROM orders WHERE status IN ('accepted', 'in_locker') "
            "AND pickup_by <= ? ORDER BY pickup_by",
            (now,),
        )
        return [_order(r) for r in rows]

    async def next_deadline(self) -> float | None:
        """The earliest ``pickup_by`` of an open order."""
        row = await self.db.fetchone(
            "SELECT min(pickup_by) FROM orders WHERE status IN ('accepted', 'in_locker')"
        )
        return float(row[0]) if row and row[0] is not None else None

    async def compartments(self, bank: str) -> dict[int, tuple[CompartmentState, str | None]]:
        """Recorded compartment states of a bank (absent: free)."""
        rows = await self.db.fetchall(
            "SELECT number, state, order_id FROM compartments WHERE bank = ?", (bank,)
        )
        return {int(n): (CompartmentState(s), o) for n, s, o in rows}

    async def compartment(self, bank: str, number: int) -> tuple[CompartmentState, str | None]:
        """One compartment's recorded state (free when never used)."""
        row = await self.db.fetchone(
            "SELECT state, order_id FROM compartments WHERE bank = ? AND number = ?", (bank, number)
        )
        return (CompartmentState(row[0]), row[1]) if row else (CompartmentState.FREE, None)


def set_compartment(
    bank: str, number: int, state: CompartmentState, order_id: str | None = None
) -> Statement:
    """The statement recording a compartment's state."""
    return (
        "INSERT OR REPLACE INTO compartments(bank, number, state, order_id) VALUES (?, ?, ?, ?)",
        (bank, number, state.value, order_id),
    )


def set_status(
    order_id: str, status: OrderStatus, *, event_index: int = 0, keep_code: bool = False
) -> Statement:
    """The statement moving an order to ``status`` (its code forgotten unless ``keep_code``)."""
    if keep_code:
        return (
            "UPDATE orders SET status = ?, seq = ? WHERE order_id = ?",
            (status.value, SeqOf(event_index), order_id),
        )
    return (
        "UPDATE orders SET status = ?, code_hash = NULL, seq = ? WHERE order_id = ?",
        (status.value, SeqOf(event_index), order_id),
    )


def updated_event(db: Database, order: Order, status: OrderStatus, **extra: Any) -> EventDraft:
    """An ``order.updated`` draft (``bank``/``compartment`` included when the order has them)."""
    data: dict[str, Any] = {"order_id": order.order_id, "status": status.value}
    if order.bank is not None and order.compartment is not None:
        data["bank"], data["compartment"] = order.bank, order.compartment
    data.update(extra)
    return db.draft("order.updated", data)


# --- the service ----------------------------------------------------------------------------


class OrderService:
    """Handles the order commands and the expiry timer; shares the lockers' state lock."""

    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        clock: ClockStatus,
        lock: asyncio.Lock,
        on_compartment_change: Callable[[str], None],
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.inventory = inventory
        self.store = OrderStore(db)
        self._clock = clock
        self._lock = lock
        self._changed = on_compartment_change
        self._now = now
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Re-read the next deadline now (an order was added or changed)."""
        self._wake.set()

    async def create(self, cmd: Command, data: CreateData) -> Outcome:
        """``order.pickup.create``: reserve stock and accept, or reject an unknown SKU."""
        async with self._lock:
            known = await self.store.get(data.order_id)
            if known is not None:
                return Outcome(data={"order_id": known.order_id, "status": known.status.value})
            pickup_by = parse_rfc3339(data.pickup_by)
            items = tuple((i.sku, i.qty) for i in data.items)
            insert = self._insert(data, items, pickup_by)
            unknown = [sku for sku, _ in items if not self.inventory.known(sku)]
            if unknown:
                reason = f"unknown-sku: {', '.join(unknown[:5])}"
                event = self.db.draft(
                    "order.updated",
                    {"order_id": data.order_id, "status": "rejected", "reason": reason},
                )
                log.info("order rejected", order_id=data.order_id, reason=reason)
                return Outcome(
                    "rejected",
                    "unknown-sku",
                    f"not in the inventory: {', '.join(unknown[:5])}",
                    data={"order_id": data.order_id, "status": "rejected"},
                    events=(event,),
                    statements=(insert(OrderStatus.REJECTED),),
                )
            event = self.db.draft(
                "order.updated", {"order_id": data.order_id, "status": "accepted"}
            )
            await self.inventory.commit(
                events=[event],
                statements=[insert(OrderStatus.ACCEPTED)],
                reserve=Reservation(data.order_id, items),
            )
        log.info("order accepted", order_id=data.order_id, command_id=cmd.id)
        self.wake()
        return Outcome(data={"order_id": data.order_id, "status": "accepted"})

    @staticmethod
    def _insert(
        data: CreateData, items: tuple[tuple[str, int], ...], pickup_by: float
    ) -> Callable[[OrderStatus], Statement]:
        def make(status: OrderStatus) -> Statement:
            return (
                "INSERT INTO orders(order_id, status, size, items, pickup_by, customer_ref, seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    data.order_id,
                    status.value,
                    data.size,
                    json.dumps(items),
                    pickup_by,
                    data.customer_ref,
                    SeqOf(0),
                ),
            )

        return make

    async def cancel(self, cmd: Command, data: CancelData) -> Outcome:
        """``order.pickup.cancel``: release the stock; a parcel in a locker awaits retrieval."""
        async with self._lock:
            order = await self.store.get(data.order_id)
            if order is None:
                return Outcome("rejected", "unknown-order", f"no order {data.order_id!r}")
            if order.status is OrderStatus.CANCELLED:
                return Outcome(data={"order_id": order.order_id, "status": "cancelled"})
            if order.status not in (OrderStatus.ACCEPTED, OrderStatus.IN_LOCKER):
                return Outcome(
                    "rejected", "wrong-state", f"order {order.order_id} is {order.status.value}"
                )
            await self._close(order, OrderStatus.CANCELLED)
        log.info("order cancelled", order_id=data.order_id, command_id=cmd.id)
        return Outcome(data={"order_id": order.order_id, "status": "cancelled"})

    async def _close(self, order: Order, status: OrderStatus) -> None:
        """Expire or cancel an open order (caller holds the lock)."""
        stmts = [set_status(order.order_id, status)]
        if order.bank is not None and order.compartment is not None:
            state, holder = await self.store.compartment(order.bank, order.compartment)
            if state is CompartmentState.OCCUPIED and holder == order.order_id:
                stmts.append(
                    set_compartment(
                        order.bank, order.compartment, CompartmentState.RETRIEVE, order.order_id
                    )
                )
        # an expired parcel keeps its code on file so the kiosk can answer "expired"
        if status is OrderStatus.EXPIRED and order.code_hash is not None:
            stmts[0] = set_status(order.order_id, status, keep_code=True)
        await self.inventory.commit(
            events=[updated_event(self.db, order, status)],
            statements=stmts,
            release=order.reservation,
        )
        if order.bank is not None:
            self._changed(order.bank)

    async def run_expiry(self) -> None:
        """Expire orders at their ``pickup_by``; sleeps until the next deadline or a change."""
        while True:
            self._wake.clear()
            deadline = await self.store.next_deadline()
            now = self._now()
            if deadline is not None and deadline <= now and self._clock.synced():
                await self._expire_due(now)
                continue
            wait_s = None if deadline is None else min(max(deadline - now, 0.0), MAX_TIMER_S)
            if deadline is not None and deadline <= now:
                wait_s = MAX_TIMER_S  # clock not trusted: expiry waits until it is
            try:
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _expire_due(self, now: float) -> None:
        async with self._lock:
            for order in await self.store.due(now):
                log.info("order expired", order_id=order.order_id, status=order.status.value)
                await self._close(order, OrderStatus.EXPIRED)
