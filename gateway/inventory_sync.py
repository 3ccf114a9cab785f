"""Cloud inventory commands (cloud-api.md): ``inventory.snapshot`` and ``inventory.adjust``.

Transactions: the dispatcher commits a handler's ``Outcome.statements`` with the
``command.result`` and the replay-cache row. That is used where no stock changes: storing a
non-final snapshot part (or rejecting one) commits in the result's own transaction. Effects on
stock (applying a complete snapshot, an adjustment) commit *in the handler* through
:class:`~gateway.inventory.Inventory`, the only writer of stock tables, so its in-memory cache
stays in commit order; the result follows in the next transaction. Should the gateway die
between the two, the command was never answered or remembered, the cloud sends it again, and a
business key makes the repeat a no-op that still yields the (first and only) result:
``snapshots_applied.snapshot_id`` and ``adjustments.adjustment_id``. The same keys make a part or
an adjustment repeated under a new command id idempotent.

Snapshot rules: all parts of a ``snapshot_id`` must agree on ``parts`` and ``as_of_seq``; an
``as_of_seq`` beyond the gateway's last seq is ``seq-ahead`` (the cloud cannot have folded
events that do not exist: a replaced database, most likely); one below the applied snapshot's is
``stale-snapshot`` (a late delivery: applying it would unfold movements already folded). An equal
``as_of_seq`` is applied (a nightly snapshot of an idle store has one); the cloud must therefore
not issue two *different* snapshots with the same ``as_of_seq`` out of order. An incomplete
snapshot expires ``inventory.snapshot_expiry_s`` after its first part arrived; expired parts are
deleted in the commit of the next snapshot command, so no timer runs (leftover parts are a few
rows and count for nothing until then).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from gateway.commands import Command, CommandSpec, Outcome
from gateway.db import Database, SeqOf, Statement
from gateway.errors import StorageError
from gateway.inventory import Inventory, Move

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger(__name__)

MAX_ON_HAND = 10**12
Sku = Annotated[StrictStr, Field(min_length=1, max_length=64)]
Key = Annotated[StrictStr, Field(min_length=1, max_length=128)]


class _Edge(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class SnapshotItemIn(_Edge):
    """One SKU's stock as the cloud folded it."""

    sku: Sku
    on_hand: Annotated[StrictInt, Field(ge=-MAX_ON_HAND, le=MAX_ON_HAND)]


class SnapshotIn(_Edge):
    """``inventory.snapshot`` data."""

    snapshot_id: Key
    as_of_seq: Annotated[StrictInt, Field(ge=0)]
    part: Annotated[StrictInt, Field(ge=1)]
    parts: Annotated[StrictInt, Field(ge=1, le=10_000)]
    items: list[SnapshotItemIn]


class AdjustIn(_Edge):
    """``inventory.adjust`` data."""

    adjustment_id: Key
    sku: Sku
    delta: Annotated[StrictInt, Field(ge=-MAX_ON_HAND, le=MAX_ON_HAND)]
    reason: Annotated[StrictStr, Field(min_length=1, max_length=200)]


@dataclass(frozen=True, slots=True)
class StoredPart:
    """A snapshot part waiting for its siblings."""

    part: int
    parts: int
    as_of_seq: int
    items: tuple[tuple[str, int], ...]
    received_at: float


def _invalid(detail: str) -> Outcome:
    return Outcome("rejected", "invalid", detail)


def _failed(err: StorageError) -> Outcome:
    return Outcome("failed", "storage-error", f"not applied, try again: {err}")


class InventorySync:
    """Handlers of the two inventory commands (see module docstring)."""

    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        *,
        snapshot_expiry_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.inventory = inventory
        self.snapshot_expiry_s = snapshot_expiry_s
        self.clock = clock

    def specs(self) -> dict[str, CommandSpec]:
        """The command table entries."""
        return {
            "inventory.snapshot": CommandSpec(self.on_snapshot, SnapshotIn),
            "inventory.adjust": CommandSpec(self.on_adjust, AdjustIn),
        }

    # --- snapshot -----------------------------------------------------------------------------

    def _expire_statement(self, now: float) -> Statement:
        return (
            "DELETE FROM snapshot_parts WHERE snapshot_id IN (SELECT snapshot_id FROM "
            "snapshot_parts GROUP BY snapshot_id HAVING min(received_at) < ?)",
            (now - self.snapshot_expiry_s,),
        )

    async def _stored(self, snapshot_id: str, now: float) -> dict[int, StoredPart]:
        rows = await self.db.fetchall(
            "SELECT part, parts, as_of_seq, items, received_at FROM snapshot_parts "
            "WHERE snapshot_id = ?",
            (snapshot_id,),
        )
        stored = {
            int(r[0]): StoredPart(
                int(r[0]), int(r[1]), int(r[2]), tuple(map(tuple, json.loads(r[3]))), float(r[4])
            )
            for r in rows
        }
        if stored and min(p.received_at for p in stored.values()) < now - self.snapshot_expiry_s:
            return {}  # expired: the expiry statement deletes them in this command's commit
        return stored

    async def _applied(self, snapshot_id: str) -> bool:
        row = await self.db.fetchone(
            "SELECT 1 FROM snapshots_applied WHERE snapshot_id = ?", (snapshot_id,)
        )
        return row is not None

    def _seq_problem(self, data: SnapshotIn) -> Outcome | None:
        if data.as_of_seq > self.db.last_seq:
            return Outcome(
                "rejected",
                "seq-ahead",
                f"data.as_of_seq: {data.as_of_seq} is beyond the last event seq "
                f"{self.db.last_seq} of this gateway",
            )
        if data.as_of_seq < self.inventory.snapshot_as_of_seq:
            return Outcome(
                "rejected",
                "stale-snapshot",
                f"data.as_of_seq: {data.as_of_seq} is older than the applied snapshot's "
                f"{self.inventory.snapshot_as_of_seq}",
            )
        return None

    async def on_snapshot(self, cmd: Command, data: SnapshotIn) -> Outcome:
        """Store one part; apply the snapshot atomically when its last part arrives."""
        log.info("snapshot part", command_id=cmd.id, snapshot_id=data.snapshot_id, part=data.part)
        now = self.clock()
        expire = self._expire_statement(now)
        summary = {"snapshot_id": data.snapshot_id, "part": data.part, "parts": data.parts}
        if data.part > data.parts:
            return _invalid(f"data.part: {data.part} is beyond parts ({data.parts})")
        skus = [i.sku for i in data.items]
        if len(set(skus)) != len(skus):
            return _invalid("data.items: a sku appears more than once")
        if await self._applied(data.snapshot_id):
            return Outcome(data={**summary, "applied": True, "already_applied": True})
        problem = self._seq_problem(data)
        if problem is not None:
            return problem
        stored = await self._stored(data.snapshot_id, now)
        for other in stored.values():
            if (other.parts, other.as_of_seq) != (data.parts, data.as_of_seq):
                return _invalid(
                    f"data.parts/as_of_seq: {data.parts}/{data.as_of_seq} disagree with part "
                    f"{other.part}'s {other.parts}/{other.as_of_seq}"
                )
        if data.part in stored or len(stored) + 1 < data.parts:
            received = len(stored | {data.part: None})
            store: tuple[Statement, ...] = (
                expire,
                (
                    "INSERT OR IGNORE INTO snapshot_parts(snapshot_id, part, parts, as_of_seq, "
                    "items, received_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        data.snapshot_id,
                        data.part,
                        data.parts,
                        data.as_of_seq,
                        json.dumps([[i.sku, i.on_hand] for i in data.items]),
                        now,
                    ),
                ),
            )
            return Outcome(
                data={**summary, "received": received, "applied": False}, statements=store
            )
        return await self._apply(data, stored, expire, summary)

    async def _apply(
        self,
        data: SnapshotIn,
        stored: Mapping[int, StoredPart],
        expire: Statement,
        summary: Mapping[str, Any],
    ) -> Outcome:
        items: dict[str, int] = {i.sku: i.on_hand for i in data.items}
        drop = ("DELETE FROM snapshot_parts WHERE snapshot_id = ?", (data.snapshot_id,))
        for part in stored.values():
            for sku, qty in part.items:
                if sku in items:
                    return Outcome(
                        "rejected",
                        "invalid",
                        f"data.items: sku {sku!r} appears in more than one part; snapshot dropped",
                        statements=(expire, drop),
                    )
                items[sku] = qty
        applied = (
            "INSERT INTO snapshots_applied(snapshot_id, as_of_seq, parts, applied_at) "
            "VALUES (?, ?, ?, ?)",
            (data.snapshot_id, data.as_of_seq, data.parts, self.clock()),
        )
        try:
            await self.inventory.apply_snapshot(
                data.as_of_seq, items, statements=[expire, drop, applied]
            )
        except StorageError as err:
            return _failed(err)
        return Outcome(
            data={**summary, "received": data.parts, "applied": True, "skus": len(items)}
        )

    # --- adjust -------------------------------------------------------------------------------

    async def on_adjust(self, cmd: Command, data: AdjustIn) -> Outcome:
        """Commit one stock movement per ``adjustment_id`` (a repeat answers the first seq)."""
        summary = {"adjustment_id": data.adjustment_id, "sku": data.sku, "delta": data.delta}
        row = await self.db.fetchone(
            "SELECT seq FROM adjustments WHERE adjustment_id = ?", (data.adjustment_id,)
        )
        if row is not None:
            return Outcome(data={**summary, "seq": int(row[0]), "already_applied": True})
        try:
            committed = await self.inventory.commit(
                statements=[
                    (
                        "INSERT INTO adjustments(adjustment_id, seq) VALUES (?, ?)",
                        (data.adjustment_id, SeqOf(0)),
                    )
                ],
                moves=[Move(data.sku, data.delta, "adjustment", data.adjustment_id)],
                refusable=False,  # decided in the cloud; refusing would make the two sides diverge
            )
        except StorageError as err:
            return _failed(err)
        log.info(
            "stock adjusted",
            command_id=cmd.id,
            adjustment_id=data.adjustment_id,
            sku=data.sku,
            delta=data.delta,
            reason=data.reason,
            seq=committed.seqs[0],
        )
        return Outcome(data={**summary, "seq": committed.seqs[0], "already_applied": False})


async def install(gw: Gateway, stack: AsyncExitStack) -> None:
    """Register the inventory commands."""
    del stack  # no resources of its own
    sync = InventorySync(
        gw.db, gw.inventory, snapshot_expiry_s=gw.config.inventory.snapshot_expiry_s
    )
    for name, spec in sync.specs().items():
        gw.dispatcher.register(name, spec)
