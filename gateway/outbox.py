"""Outbox bookkeeping over the database: what is pending, sent, acknowledged, and pruning.

States of an event: *pending* (seq > sent_through) → *sent* (a broker PUBACKed it) → *acked*
(seq ≤ acked_through, the backend's ``ack``). Events stay until acked and for the retention time
after, as far as the size bound allows. Only the watermarks are written, never per-event flags.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from gateway.db import Database, Work

log = structlog.get_logger(__name__)

_BUMP = "UPDATE meta SET value = max(value, ?) WHERE key = ?"


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Queue figures, as in the health message."""

    last_seq: int
    pending: int
    unacked: int
    oldest_pending_age_s: float | None
    last_acked_seq: int

    def as_health(self) -> dict[str, object]:
        """The ``outbox`` object of the health message."""
        return {
            "pending": self.pending,
            "unacked": self.unacked,
            "oldest_pending_age_s": self.oldest_pending_age_s,
            "last_acked_seq": self.last_acked_seq,
        }


class Outbox:
    """Watermarks and queries of the outbox (the events table lives in :mod:`gateway.db`)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.acked_through = 0
        self.sent_through = 0
        self._persisted = (0, 0)

    async def load(self) -> None:
        """Read the persisted watermarks."""
        self.acked_through = await self.db.meta("acked_through")
        self.sent_through = max(await self.db.meta("sent_through"), self.acked_through)
        self._persisted = (self.sent_through, self.acked_through)

    async def fetch_from(self, seq: int, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` committed events with seq ≥ ``seq``, in seq order: (seq, body)."""
        rows = await self.db.fetchall(
            "SELECT seq, body FROM events WHERE seq >= ? ORDER BY seq LIMIT ?", (seq, limit)
        )
        return rows  # (INTEGER, TEXT) columns arrive as (int, str) already

    async def first_held_seq(self) -> int | None:
        """The lowest seq still in the database."""
        row = await self.db.fetchone("SELECT min(seq) FROM events")
        return int(row[0]) if row and row[0] is not None else None

    def mark_sent(self, through_seq: int) -> None:
        """A broker PUBACKed events up to here (persisted lazily by :meth:`persist`)."""
        self.sent_through = max(self.sent_through, through_seq)

    def ack(self, through_seq: int) -> bool:
        """Apply a backend ack in memory; True when it moved the watermark forward.

        Persisted by :meth:`persist` (about once a second): an ack lost in a crash only makes
        the gateway send a few acknowledged events again, which the backend dedups.
        """
        if through_seq <= self.acked_through:
            return False
        if through_seq > self.db.last_seq:
            log.warning(
                "ack beyond the last event ignored",
                through_seq=through_seq,
                last_seq=self.db.last_seq,
            )
            return False
        self.acked_through = through_seq
        self.sent_through = max(self.sent_through, through_seq)
        return True

    async def persist(self) -> None:
        """Write the sent/acked watermarks if they moved (one small commit)."""
        marks = ((self.sent_through, "sent_through"), (self.acked_through, "acked_through"))
        if (self.sent_through, self.acked_through) == self._persisted:
            return
        snapshot = (self.sent_through, self.acked_through)
        await self.db.submit(
            Work(statements=[(_BUMP, (value, key)) for value, key in marks], refusable=False)
        )
        self._persisted = snapshot

    async def stats(self) -> OutboxStats:
        """Current queue figures."""
        last = self.db.last_seq
        sent = min(max(self.sent_through, self.acked_through), last)
        age: float | None = None
        if last > sent:
            row = await self.db.fetchone("SELECT created_at FROM events WHERE seq = ?", (sent + 1,))
            if row is not None:
                age = round(max(0.0, time.time() - float(row[0])), 3)
        return OutboxStats(
            last_seq=last,
            pending=last - sent,
            unacked=sent - self.acked_through,
            oldest_pending_age_s=age,
            last_acked_seq=self.acked_through,
        )

    async def prune(self, *, retention_s: float, force: bool = False) -> int:
        """Delete acked events older than the retention (all acked ones when ``force``).

        The ack watermark is written in the same transaction as the delete, so the database
        never holds "not acknowledged" for an event it no longer has.
        """
        cutoff = time.time() if force else time.time() - retention_s
        acked = self.acked_through
        before = await self.db.fetchone(
            "SELECT count(*) FROM events WHERE seq <= ? AND created_at < ?", (acked, cutoff)
        )
        n = int(before[0]) if before else 0
        if n:
            await self.db.submit(
                Work(
                    statements=[
                        (_BUMP, (acked, "acked_through")),
                        ("DELETE FROM events WHERE seq <= ? AND created_at < ?", (acked, cutoff)),
                    ],
                    refusable=False,
                )
            )
            await self.db.refresh_usage()
            log.info("pruned acknowledged events", count=n, forced=force)
        return n
