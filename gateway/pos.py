"""The POS bridge (store-api.md): sales, returns and stock lookups from the tills.

Requests are validated at the edge (pydantic models below, then cross-field checks), committed
through :class:`~gateway.inventory.Inventory` together with their stock movements and outbox
events, and answered ``accepted`` with the event seq only after that commit returned.

Idempotency: ``sale_id`` and ``return_id`` share one key space (the ``sales`` table). A key that
is already committed answers ``duplicate`` with the original seq, whichever terminal sends it
again (ids are idempotency keys; a different terminal is logged). A key that is still being
committed makes the second request wait for the first and then answer ``duplicate``. A
``return_id`` equal to an earlier ``sale_id`` (or the reverse) is ``rejected`` with
``id-conflict``: answering ``duplicate`` there would tell the till a return was recorded that
never was.

Returns: ``payments`` (the refunds) are optional, since a return may be settled as an exchange
or store credit outside the POS; when given they must add up to ``total_minor`` and they are
carried in ``return.completed``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from gateway.clock import format_rfc3339, parse_rfc3339
from gateway.config import PosSection
from gateway.db import Database, SeqOf
from gateway.inventory import Inventory, Move
from gateway.storebus import Request, RequestError, Route

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger(__name__)

MAX_STOCK_SKUS = 500
MAX_QTY = 1_000_000
MAX_PRICE_MINOR = 10**12  # keeps every sum far inside SQLite's 64-bit integers

Sku = Annotated[StrictStr, Field(min_length=1, max_length=64)]
Kind = Literal["sale", "return"]


# --- edge models (pydantic) -------------------------------------------------------------------


class _Edge(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class LineIn(_Edge):
    """One sold or returned line."""

    sku: Sku
    qty: Annotated[StrictInt, Field(gt=0, le=MAX_QTY)]
    unit_price_minor: Annotated[StrictInt, Field(ge=0, le=MAX_PRICE_MINOR)]


class PaymentIn(_Edge):
    """One tender of a sale (or refund of a return)."""

    method: Literal["cash", "card", "voucher", "other"]
    amount_minor: Annotated[StrictInt, Field(gt=0)]
    payment_ref: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None


class _TicketIn(_Edge):
    lines: Annotated[list[LineIn], Field(min_length=1, max_length=10_000)]
    total_minor: StrictInt
    currency: Annotated[StrictStr, Field(pattern=r"^[A-Z]{3}$")]
    completed_at: StrictStr

    @field_validator("completed_at")
    @classmethod
    def _rfc3339(cls, value: str) -> str:
        """Normalise to RFC 3339 UTC with milliseconds."""
        try:
            return format_rfc3339(parse_rfc3339(value))
        except ValueError as err:
            raise ValueError(f"must be an RFC 3339 time ({err})") from err


class SaleIn(_TicketIn):
    """``store/v1/pos/{terminal}/sale``."""

    sale_id: StrictStr
    payments: list[PaymentIn]


class ReturnIn(_TicketIn):
    """``store/v1/pos/{terminal}/return``."""

    return_id: StrictStr
    original_sale_id: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None
    payments: list[PaymentIn] | None = None


class StockIn(_Edge):
    """``store/v1/pos/{terminal}/stock``."""

    request_id: StrictStr
    skus: Annotated[list[Sku], Field(min_length=1, max_length=MAX_STOCK_SKUS)]


# --- inside (frozen dataclasses) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recorded:
    """A committed sale or return: what a repeated id is answered with."""

    kind: Kind
    terminal_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class Ticket:
    """A validated sale or return, ready to commit."""

    kind: Kind
    key: str
    terminal_id: str
    event: Mapping[str, Any]
    moves: tuple[Move, ...]


def _lines_json(lines: Sequence[LineIn]) -> list[dict[str, Any]]:
    return [{"sku": x.sku, "qty": x.qty, "unit_price_minor": x.unit_price_minor} for x in lines]


def _payments_json(payments: Sequence[PaymentIn]) -> list[dict[str, Any]]:
    return [p.model_dump(exclude_none=True) for p in payments]


def check_ticket(body: _TicketIn, payments: Sequence[PaymentIn] | None, pos: PosSection) -> None:
    """Raise RequestError naming the field when the ticket's figures do not add up."""
    if len(body.lines) > pos.max_lines:
        raise RequestError(
            "too-many-lines", f"lines: {len(body.lines)} lines, at most {pos.max_lines} allowed"
        )
    if body.currency not in pos.currencies:
        raise RequestError(
            "unknown-currency",
            f"currency: {body.currency!r} is not accepted here ({', '.join(pos.currencies)})",
        )
    expected = sum(x.qty * x.unit_price_minor for x in body.lines)
    if body.total_minor != expected:
        raise RequestError(
            "total-mismatch",
            f"total_minor: {body.total_minor} is not the sum of qty x unit_price_minor ({expected})",
        )
    if payments is not None:
        paid = sum(p.amount_minor for p in payments)
        if paid != body.total_minor:
            raise RequestError(
                "payment-mismatch",
                f"payments: amount_minor adds up to {paid}, total_minor is {body.total_minor}",
            )


def sale_ticket(terminal_id: str, body: SaleIn, pos: PosSection) -> Ticket:
    """The checked sale as an event and its movements (RequestError when it does not add up)."""
    check_ticket(body, body.payments, pos)
    event = {
        "sale_id": body.sale_id,
        "terminal_id": terminal_id,
        "lines": _lines_json(body.lines),
        "total_minor": body.total_minor,
        "currency": body.currency,
        "payments": _payments_json(body.payments),
        "completed_at": body.completed_at,
    }
    moves = tuple(Move(x.sku, -x.qty, "sale", body.sale_id) for x in body.lines)
    return Ticket("sale", body.sale_id, terminal_id, event, moves)


def return_ticket(terminal_id: str, body: ReturnIn, pos: PosSection) -> Ticket:
    """The checked return as an event and its movements (RequestError when it does not add up)."""
    check_ticket(body, body.payments, pos)
    event: dict[str, Any] = {"return_id": body.return_id, "terminal_id": terminal_id}
    if body.original_sale_id is not None:
        event["original_sale_id"] = body.original_sale_id
    event |= {
        "lines": _lines_json(body.lines),
        "total_minor": body.total_minor,
        "currency": body.currency,
        "completed_at": body.completed_at,
    }
    if body.payments is not None:
        event["payments"] = _payments_json(body.payments)
    moves = tuple(Move(x.sku, x.qty, "return", body.return_id) for x in body.lines)
    return Ticket("return", body.return_id, terminal_id, event, moves)


_INSERT_SALE = "INSERT INTO sales(sale_id, kind, terminal_id, seq) VALUES (?, ?, ?, ?)"


class PosService:
    """Sales, returns and stock lookups; idempotent per id (see module docstring)."""

    def __init__(self, db: Database, inventory: Inventory, settings: PosSection) -> None:
        self.db = db
        self.inventory = inventory
        self.settings = settings
        # id → the first request's outcome (None: it was not recorded, the waiter tries itself)
        self._inflight: dict[str, asyncio.Future[Recorded | None]] = {}

    def routes(self) -> list[Route]:
        """The store-bus routes this service answers."""
        return [
            Route("pos", "sale", "sale_id", SaleIn, self.on_sale, "sale/result"),
            Route("pos", "return", "return_id", ReturnIn, self.on_return, "return/result"),
            Route("pos", "stock", "request_id", StockIn, self.on_stock, "stock/result"),
        ]

    async def on_sale(self, req: Request, body: SaleIn) -> dict[str, Any]:
        """Commit a sale once; answer accepted/duplicate with the sale.completed seq."""
        return await self.record(sale_ticket(req.owner, body, self.settings))

    async def on_return(self, req: Request, body: ReturnIn) -> dict[str, Any]:
        """Commit a return once; answer accepted/duplicate with the return.completed seq."""
        return await self.record(return_ticket(req.owner, body, self.settings))

    async def on_stock(self, _req: Request, body: StockIn) -> dict[str, Any]:
        """Answer from the in-memory stock model (no I/O)."""
        inv = self.inventory
        return {
            "request_id": body.request_id,
            "items": [item.as_json() for item in inv.lookup(body.skus)],
            "as_of": inv.as_of,
            "stale": inv.stale(),
        }

    async def record(self, ticket: Ticket) -> dict[str, Any]:
        """Commit ``ticket`` unless its id is committed or in flight; the reply body."""
        while True:
            first = self._inflight.get(ticket.key)
            if first is None:
                return await self._record_first(ticket)
            earlier = await asyncio.shield(first)
            if earlier is not None:
                return self._repeat(ticket, earlier)
            # the first attempt was not recorded: loop and try ourselves

    async def _record_first(self, ticket: Ticket) -> dict[str, Any]:
        mine: asyncio.Future[Recorded | None] = asyncio.get_running_loop().create_future()
        self._inflight[ticket.key] = mine  # registered before any await: no twin can slip by
        outcome: Recorded | None = None
        try:
            earlier = await self._committed(ticket.key)
            if earlier is not None:
                outcome = earlier
                return self._repeat(ticket, earlier)
            seq = await self._commit(ticket)
            outcome = Recorded(ticket.kind, ticket.terminal_id, seq)
            return {f"{ticket.kind}_id": ticket.key, "status": "accepted", "seq": seq}
        finally:
            del self._inflight[ticket.key]
            mine.set_result(outcome)

    async def _committed(self, key: str) -> Recorded | None:
        row = await self.db.fetchone(
            "SELECT kind, terminal_id, seq FROM sales WHERE sale_id = ?", (key,)
        )
        if row is None:
            return None
        kind: Kind = "return" if row[0] == "return" else "sale"
        return Recorded(kind, str(row[1]), int(row[2]))

    async def _commit(self, ticket: Ticket) -> int:
        committed = await self.inventory.commit(
            events=[self.db.draft(f"{ticket.kind}.completed", ticket.event)],
            statements=[(_INSERT_SALE, (ticket.key, ticket.kind, ticket.terminal_id, SeqOf(0)))],
            moves=ticket.moves,
        )
        log.info(
            f"{ticket.kind} recorded",
            id=ticket.key,
            terminal_id=ticket.terminal_id,
            seq=committed.seqs[0],
            lines=len(ticket.moves),
        )
        return committed.seqs[0]

    @staticmethod
    def _repeat(ticket: Ticket, earlier: Recorded) -> dict[str, Any]:
        id_field = f"{ticket.kind}_id"
        if earlier.kind != ticket.kind:
            raise RequestError(
                "id-conflict",
                f"{id_field}: {ticket.key!r} is already the id of a {earlier.kind} (seq "
                f"{earlier.seq}); this {ticket.kind} was not recorded",
            )
        if earlier.terminal_id != ticket.terminal_id:
            log.warning(
                "id repeated by another terminal; answered duplicate",
                id=ticket.key,
                terminal_id=ticket.terminal_id,
                first_terminal_id=earlier.terminal_id,
            )
        return {id_field: ticket.key, "status": "duplicate", "seq": earlier.seq}


async def install(gw: Gateway, stack: AsyncExitStack) -> None:
    """Register the POS routes on the store bus."""
    del stack  # nothing to close: the service holds no resources of its own
    service = PosService(gw.db, gw.inventory, gw.config.pos)
    for route in service.routes():
        gw.store_bus.add_route(route)
