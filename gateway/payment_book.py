"""The payments table and its events: every write of the payment flow is one unit of work here.

``insert`` (authorizing) → ``confirm`` (the 04 0F, before it is acknowledged) → ``complete``
(final status + ``payment.completed``) → for in_doubt, later ``resolve`` (+ ``payment.resolved``).
The book also knows which payments are in_doubt, so recovery and technicians can settle them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from gateway.db import Database, SeqOf, Work
from gateway.payment_records import (
    Final,
    Payment,
    Receipt,
    State,
    completed_data,
    resolved_data,
    result_body,
)

_COLUMNS = (
    "request_id, till, device_id, kind, amount_minor, currency, reversal_of,"
    " original_receipt_no, receipt, state, result, recheck"
)
_SELECT = f"SELECT {_COLUMNS} FROM payments"  # noqa: S608 - constant text
_INSERT = (
    "INSERT INTO payments(request_id, till, device_id, kind, amount_minor, currency, reversal_of,"
    " original_receipt_no, state, created_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'authorizing', ?, ?)"
)
_CONFIRMING = (
    "UPDATE payments SET state = 'confirming', receipt = ?, updated_at = ? WHERE request_id = ?"
)
_FINAL = (
    "UPDATE payments SET state = ?, receipt = ?, result = ?, recheck = ?, updated_at = ?, seq = ?"
    " WHERE request_id = ?"
)
_RESOLVED = (
    "UPDATE payments SET state = ?, receipt = ?, result = ?, recheck = 0, updated_at = ?,"
    " resolved_seq = ? WHERE request_id = ?"
)
_NO_RECHECK = "UPDATE payments SET recheck = 0, updated_at = ? WHERE request_id = ?"


@dataclass(frozen=True, slots=True)
class Stored:
    """A payment row: the payment, its state and (once final) the result body sent to the POS."""

    payment: Payment
    state: State
    result: dict[str, Any] | None
    recheck: bool


@dataclass(frozen=True, slots=True)
class Doubt:
    """A payment reported in_doubt; ``recheck``: asking its terminal again may settle it."""

    payment: Payment
    recheck: bool


def _stored(row: tuple[Any, ...]) -> Stored:
    payment = Payment(
        request_id=row[0],
        till=row[1],
        device_id=row[2],
        kind=row[3],
        amount_minor=row[4],
        currency=row[5],
        reversal_of=row[6],
        original_receipt_no=row[7],
        receipt=Receipt.from_json(row[8]),
    )
    return Stored(payment, row[9], json.loads(row[10]) if row[10] else None, bool(row[11]))


class PaymentBook:
    """Reads and atomic writes of payments (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.doubtful: dict[str, Doubt] = {}

    async def load_unsettled(self) -> list[Stored]:
        """Payments not final (authorizing, confirming), oldest first; in_doubt ones are noted."""
        rows = await self._db.fetchall(
            f"{_SELECT} WHERE state IN ('authorizing', 'confirming', 'in_doubt') ORDER BY created_at"
        )
        unsettled = []
        for stored in map(_stored, rows):
            if stored.state == "in_doubt":
                self.doubtful[stored.payment.request_id] = Doubt(stored.payment, stored.recheck)
            else:
                unsettled.append(stored)
        return unsettled

    async def get(self, request_id: str) -> Stored | None:
        """The row of a request_id, or None."""
        row = await self._db.fetchone(f"{_SELECT} WHERE request_id = ?", (request_id,))
        return _stored(row) if row is not None else None

    async def reversed_by(self, original_id: str) -> str | None:
        """The request_id of a reversal of this payment that did not fail, if any."""
        row = await self._db.fetchone(
            "SELECT request_id FROM payments WHERE reversal_of = ?"
            " AND state NOT IN ('declined', 'aborted', 'failed')",
            (original_id,),
        )
        return str(row[0]) if row is not None else None

    async def insert(self, p: Payment) -> None:
        """Commit a new payment as ``authorizing`` (refused when storage is full)."""
        now = time.time()
        params = (p.request_id, p.till, p.device_id, p.kind, p.amount_minor, p.currency,
                  p.reversal_of, p.original_receipt_no, now, now)  # fmt: skip
        await self._db.submit(Work(statements=[(_INSERT, params)]))

    async def confirm(self, p: Payment, receipt: Receipt) -> None:
        """Commit the 04 0F's content (state ``confirming``) — before it is acknowledged."""
        statement = (_CONFIRMING, (receipt.to_json(), time.time(), p.request_id))
        await self._db.submit(Work(statements=[statement], refusable=False))

    async def complete(self, p: Payment, final: Final) -> dict[str, Any]:
        """Commit the final status with its ``payment.completed`` event; the POS answer."""
        body = result_body(p, final)
        receipt = final.receipt or p.receipt
        params = (final.status, receipt.to_json() if receipt else None, json.dumps(body),
                  int(final.recheck), time.time(), SeqOf(0), p.request_id)  # fmt: skip
        event = self._db.draft("payment.completed", completed_data(p, final))
        await self._db.submit(Work([event], [(_FINAL, params)], refusable=False))
        if final.status == "in_doubt":
            self.doubtful[p.request_id] = Doubt(p, final.recheck)
        return body

    async def resolve(self, request_id: str, final: Final, by: str) -> int | None:
        """Settle an in_doubt payment with ``payment.resolved``; its seq (None: not in doubt)."""
        doubt = self.doubtful.pop(request_id, None)
        if doubt is None:
            return None
        p = doubt.payment
        body = result_body(p, final)
        receipt = final.receipt or p.receipt
        params = (final.status, receipt.to_json() if receipt else None, json.dumps(body),
                  time.time(), SeqOf(0), request_id)  # fmt: skip
        event = self._db.draft("payment.resolved", resolved_data(p, final, by))
        try:
            committed = await self._db.submit(Work([event], [(_RESOLVED, params)], refusable=False))
        except BaseException:
            self.doubtful.setdefault(request_id, doubt)
            raise
        return committed.seqs[0]

    async def stop_rechecking(self, request_id: str) -> None:
        """Only a technician can settle this in_doubt payment now."""
        doubt = self.doubtful.get(request_id)
        if doubt is not None:
            self.doubtful[request_id] = Doubt(doubt.payment, recheck=False)
        statement = (_NO_RECHECK, (time.time(), request_id))
        await self._db.submit(Work(statements=[statement], refusable=False))
