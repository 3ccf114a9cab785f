"""Local stock: snapshot base + unfolded local movements, and click-and-collect reservations.

``on_hand(sku) = base(sku) + Σ delta`` of local movements with seq > the snapshot's
``as_of_seq`` (movements at or below it are folded into the base and deleted when the snapshot
is applied); ``reserved(sku) = Σ qty`` of open reservations; ``available = on_hand - reserved``.
Negative stock is allowed (a store sells what is physically there) and reported.

Every change commits with its events in one unit of work. The in-memory cache is updated when
the work is *enqueued* (under a lock, so cache order = commit order = seq order) and rebuilt from
the database if a commit fails; a snapshot holds the lock until it is committed and reloaded.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from gateway.clock import format_rfc3339
from gateway.db import Committed, Database, EventDraft, SeqOf, Statement, Work
from gateway.errors import StorageError

log = structlog.get_logger(__name__)

CAUSES = frozenset({"sale", "return", "adjustment", "pickup"})


@dataclass(frozen=True, slots=True)
class Move:
    """One stock movement: becomes one ``inventory.changed`` event and one movements row."""

    sku: str
    delta: int
    cause: str
    ref: str


@dataclass(frozen=True, slots=True)
class StockItem:
    """Stock of one SKU as the POS sees it."""

    sku: str
    on_hand: int
    reserved: int

    @property
    def available(self) -> int:
        """on_hand - reserved (may be negative)."""
        return self.on_hand - self.reserved

    def as_json(self) -> dict[str, object]:
        """The store API's item object."""
        return {
            "sku": self.sku,
            "on_hand": self.on_hand,
            "reserved": self.reserved,
            "available": self.available,
        }


@dataclass(frozen=True, slots=True)
class Reservation:
    """Stock held for a click-and-collect order."""

    order_id: str
    items: tuple[tuple[str, int], ...]  # (sku, qty)


def _undo_unless_committed(future: asyncio.Future[Committed], undo: Callable[[], None]) -> None:
    """Done callback: roll the cache back when the work did not commit."""
    if future.cancelled() or future.exception() is not None:
        undo()


class Inventory:
    """The stock model and the only writer of stock tables (see module docstring)."""

    def __init__(self, db: Database, *, stale_after_s: float = 86400.0) -> None:
        self.db = db
        self.stale_after_s = stale_after_s
        self.lock = asyncio.Lock()
        self._on_hand: dict[str, int] = defaultdict(int)
        self._reserved: dict[str, int] = defaultdict(int)
        self.snapshot_as_of_seq = 0
        self.snapshot_at = 0.0

    async def load(self) -> None:
        """Rebuild the cache from committed state."""
        on_hand: dict[str, int] = defaultdict(int)
        for sku, qty in await self.db.fetchall("SELECT sku, on_hand FROM stock_base"):
            on_hand[str(sku)] += int(qty)
        for sku, delta in await self.db.fetchall(
            "SELECT sku, sum(delta) FROM movements GROUP BY sku"
        ):
            on_hand[str(sku)] += int(delta)
        reserved: dict[str, int] = defaultdict(int)
        for sku, qty in await self.db.fetchall(
            "SELECT sku, sum(qty) FROM reservations GROUP BY sku"
        ):
            reserved[str(sku)] = int(qty)
        self._on_hand, self._reserved = on_hand, reserved
        self.snapshot_as_of_seq = await self.db.meta("snapshot_as_of_seq")
        self.snapshot_at = float(await self.db.meta("snapshot_at"))

    # --- reads --------------------------------------------------------------------------------

    def item(self, sku: str) -> StockItem:
        """Current stock of one SKU (unknown SKUs are 0/0)."""
        return StockItem(sku, self._on_hand.get(sku, 0), self._reserved.get(sku, 0))

    def lookup(self, skus: Iterable[str]) -> list[StockItem]:
        """Current stock of several SKUs, in the order asked."""
        return [self.item(s) for s in skus]

    def known(self, sku: str) -> bool:
        """True when the SKU has a base, a movement or a reservation."""
        return sku in self._on_hand or sku in self._reserved

    @property
    def as_of(self) -> str | None:
        """Time of the last applied snapshot (RFC 3339), or None."""
        return format_rfc3339(self.snapshot_at) if self.snapshot_at else None

    def stale(self, now: float | None = None) -> bool:
        """True when no snapshot arrived within ``stale_after_s``."""
        now = time.time() if now is None else now
        return not self.snapshot_at or now - self.snapshot_at > self.stale_after_s

    # --- writes -------------------------------------------------------------------------------

    async def commit(
        self,
        *,
        events: Sequence[EventDraft] = (),
        statements: Sequence[Statement] = (),
        moves: Sequence[Move] = (),
        reserve: Reservation | None = None,
        release: Reservation | None = None,
        refusable: bool = True,
    ) -> Committed:
        """Commit business events/statements with stock moves and reservation changes, atomically.

        Events come first in the returned seqs, then one ``inventory.changed`` per move. A
        ``SeqOf(i)`` in ``statements`` refers to the i-th of ``events``.
        """
        async with self.lock:
            work, undo = self._build(events, statements, moves, reserve, release, refusable)
            future = self.db.enqueue(work)
        try:
            # shielded: a cancelled caller (e.g. its link dropped) must not withdraw work the
            # cache already counts; the commit goes ahead and a failure still undoes the cache
            return await asyncio.shield(future)
        except StorageError:
            undo()
            raise
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: _undo_unless_committed(f, undo))
            raise

    def _build(  # noqa: PLR0917 - private; mirrors commit()'s keywords one to one
        self,
        events: Sequence[EventDraft],
        statements: Sequence[Statement],
        moves: Sequence[Move],
        reserve: Reservation | None,
        release: Reservation | None,
        refusable: bool,
    ) -> tuple[Work, Callable[[], None]]:
        all_events = list(events)
        stmts = list(statements)
        res_delta: dict[str, int] = defaultdict(int)
        if release is not None:
            stmts.append(("DELETE FROM reservations WHERE order_id = ?", (release.order_id,)))
            for sku, qty in release.items:
                res_delta[sku] -= qty
        if reserve is not None:
            for sku, qty in reserve.items:
                stmts.append(
                    (
                        "INSERT INTO reservations(order_id, sku, qty) VALUES (?, ?, ?)",
                        (reserve.order_id, sku, qty),
                    )
                )
                res_delta[sku] += qty
        for sku, d in res_delta.items():
            self._reserved[sku] += d
        oh_delta: dict[str, int] = defaultdict(int)
        for move in moves:
            if move.cause not in CAUSES:
                raise ValueError(f"unknown movement cause {move.cause!r}")
            self._on_hand[move.sku] += move.delta
            oh_delta[move.sku] += move.delta
            index = len(all_events)
            all_events.append(
                self.db.draft(
                    "inventory.changed",
                    {
                        "sku": move.sku,
                        "delta": move.delta,
                        "on_hand": self._on_hand[move.sku],
                        "reserved": self._reserved.get(move.sku, 0),
                        "cause": move.cause,
                        "ref": move.ref,
                    },
                )
            )
            stmts.append(
                (
                    "INSERT INTO movements(seq, sku, delta, cause, ref) VALUES (?, ?, ?, ?, ?)",
                    (SeqOf(index), move.sku, move.delta, move.cause, move.ref),
                )
            )
            if self._on_hand[move.sku] < 0:
                log.info("negative stock", sku=move.sku, on_hand=self._on_hand[move.sku])

        def undo() -> None:
            for sku, d in oh_delta.items():
                self._on_hand[sku] -= d
            for sku, d in res_delta.items():
                self._reserved[sku] -= d

        return Work(events=all_events, statements=stmts, refusable=refusable), undo

    async def apply_snapshot(
        self,
        as_of_seq: int,
        items: Mapping[str, int],
        *,
        events: Sequence[EventDraft] = (),
        statements: Sequence[Statement] = (),
    ) -> Committed:
        """Replace the stock base (all SKUs absent from ``items`` get base 0), atomically.

        Local movements with seq ≤ ``as_of_seq`` are folded (deleted); later ones stay on top.
        """
        now = time.time()
        stmts: list[Statement] = [
            ("DELETE FROM stock_base", ()),
            *(
                ("INSERT INTO stock_base(sku, on_hand) VALUES (?, ?)", (sku, qty))
                for sku, qty in items.items()
            ),
            ("DELETE FROM movements WHERE seq <= ?", (as_of_seq,)),
            ("UPDATE meta SET value = ? WHERE key = 'snapshot_as_of_seq'", (as_of_seq,)),
            ("UPDATE meta SET value = ? WHERE key = 'snapshot_at'", (int(now),)),
            *statements,
        ]
        async with self.lock:
            try:
                committed = await self.db.submit(
                    Work(events=events, statements=stmts, refusable=False)
                )
            finally:
                await self.load()
        log.info("inventory snapshot applied", skus=len(items), as_of_seq=as_of_seq)
        return committed
