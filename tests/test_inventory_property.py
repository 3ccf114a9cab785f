"""Property: gateway stock = cloud stock + local deltas the cloud has not folded yet.

The cloud is modelled independently of the gateway's code: it reads the gateway's committed
``inventory.changed`` events (its uplink) up to the seq it has seen, and issues snapshots at any
``as_of_seq`` it could legally send (≤ what it has seen): either folds of its own history, or
recounts at what it has seen last. Snapshots go through the real command dispatcher in several
parts, in any order, with repeated parts and repeated command ids; earlier snapshots and
adjustments are replayed under new command ids. After every step the two sides must agree.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.clock import ClockStatus
from gateway.commands import CommandDispatcher
from gateway.config import SecuritySection
from gateway.db import Database
from gateway.inventory import Inventory, Move
from gateway.inventory_sync import InventorySync

SKUS = ("a", "b", "c")
# a RAM disk where there is one: only for speed (fsync per commit)
TMP = "/dev/shm" if Path("/dev/shm").is_dir() else None

delta = st.integers(-5, 5).filter(bool)
move = st.tuples(st.just("move"), st.sampled_from(SKUS), delta, st.sampled_from(("sale", "return")))
adjust = st.tuples(st.just("adjust"), st.sampled_from(SKUS), delta, st.integers(0, 3))
sees = st.tuples(st.just("sees"), st.integers(1, 8))
advance = st.integers(0, 6)  # how many more events the cloud has seen before it snapshots
fold = st.tuples(
    st.just("fold"), advance, st.floats(0, 1), st.integers(1, 3), st.randoms(), st.booleans()
)
recount = st.tuples(
    st.just("recount"),
    advance,
    st.dictionaries(st.sampled_from(SKUS), st.integers(-3, 30)),
    st.integers(1, 3),
    st.randoms(),
    st.booleans(),
)
replay = st.tuples(st.just("replay"), st.integers(0, 5))
steps = st.lists(
    st.one_of(move, move, adjust, sees, fold, fold, recount, replay), min_size=3, max_size=16
)


@dataclass
class Cloud:
    """The cloud's side: what it has seen, the recounts it made, the commands it sent."""

    seen: int = 0
    recounts: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    sent_snapshots: list[list[dict[str, Any]]] = field(default_factory=list)
    sent_adjustments: list[dict[str, Any]] = field(default_factory=list)
    adjusted: set[str] = field(default_factory=set)
    commands: int = 0

    def truth_at(self, k: int, deltas: list[tuple[int, str, int]]) -> dict[str, int]:
        """The cloud's stock after folding every event ≤ k onto its latest recount ≤ k."""
        base_seq, values = 0, {}
        for r, v in self.recounts:  # issue order: the last one at or below k wins
            if r <= k:
                base_seq, values = r, v
        stock: dict[str, int] = defaultdict(int, values)
        for seq, sku, d in deltas:
            if base_seq < seq <= k:
                stock[sku] += d
        return stock


class Rig:
    """The gateway side: a real database, Inventory, dispatcher and inventory commands."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.inventory = Inventory(db)
        self.dispatcher = CommandDispatcher(db, SecuritySection(), ClockStatus("yes"))
        sync = InventorySync(db, self.inventory, snapshot_expiry_s=3600)
        for name, spec in sync.specs().items():
            self.dispatcher.register(name, spec)
        self.cloud = Cloud()

    async def command(self, name: str, data: dict[str, Any], cid: str | None = None) -> str:
        """Send a command through the dispatcher; returns its id."""
        if cid is None:
            self.cloud.commands += 1
            cid = f"c{self.cloud.commands}"
        env = {"id": cid, "name": name, "issued_at": "2026-11-22T18:00:00Z", "data": data}
        await self.dispatcher.handle(name, json.dumps(env).encode())
        return cid

    async def deltas(self) -> list[tuple[int, str, int]]:
        """The uplink as the cloud receives it: every committed inventory.changed."""
        rows = await self.db.fetchall(
            "SELECT seq, body FROM events WHERE type = 'inventory.changed' ORDER BY seq"
        )
        out = []
        for seq, body in rows:
            data = json.loads(body)["data"]
            out.append((int(seq), str(data["sku"]), int(data["delta"])))
        return out

    async def send_snapshot(self, parts: list[dict[str, Any]], rnd: Any, again: bool) -> None:
        """All parts, in a random order; maybe one twice (new id) and one command id twice."""
        order = list(parts)
        rnd.shuffle(order)
        if again:
            order.insert(rnd.randrange(len(order) + 1), rnd.choice(parts))
        for data in order:
            cid = await self.command("inventory.snapshot", data)
            if again:
                await self.command("inventory.snapshot", data, cid=cid)
        self.cloud.sent_snapshots.append(parts)

    def split(self, as_of: int, items: dict[str, int], nparts: int) -> list[dict[str, Any]]:
        """Snapshot data in ``nparts`` parts (SKUs with 0 are left out: base 0 anyway)."""
        sid = f"snap-{len(self.cloud.sent_snapshots)}"
        listed = [{"sku": s, "on_hand": q} for s, q in sorted(items.items()) if q]
        return [
            {
                "snapshot_id": sid,
                "as_of_seq": as_of,
                "part": i + 1,
                "parts": nparts,
                "items": listed[i::nparts],
            }
            for i in range(nparts)
        ]

    async def step(self, op: tuple[Any, ...]) -> None:
        """Apply one step of the scenario."""
        cloud = self.cloud
        kind = op[0]
        if kind == "move":
            _, sku, d, cause = op
            await self.inventory.commit(moves=[Move(sku, d, cause, f"ref-{self.db.last_seq}")])
        elif kind == "adjust":
            _, sku, d, _ = op
            data = {"adjustment_id": f"adj-{self.db.last_seq}", "sku": sku, "delta": d}
            cloud.sent_adjustments.append({**data, "reason": "count"})
            cloud.adjusted.add(data["adjustment_id"])
            await self.command("inventory.adjust", cloud.sent_adjustments[-1])
        elif kind == "sees":
            cloud.seen = min(self.db.last_seq, cloud.seen + op[1])
        elif kind == "fold":
            _, more, where, nparts, rnd, again = op
            cloud.seen = min(self.db.last_seq, cloud.seen + more)
            as_of = round(where * cloud.seen)
            items = cloud.truth_at(as_of, await self.deltas())
            await self.send_snapshot(self.split(as_of, items, nparts), rnd, again)
        elif kind == "recount":
            _, more, values, nparts, rnd, again = op
            cloud.seen = min(self.db.last_seq, cloud.seen + more)
            cloud.recounts.append((cloud.seen, dict(values)))
            await self.send_snapshot(self.split(cloud.seen, values, nparts), rnd, again)
        elif kind == "replay":
            await self.replay(op[1])

    async def replay(self, pick: int) -> None:
        """Send an earlier snapshot or adjustment again under new command ids."""
        sent: list[Any] = [*self.cloud.sent_snapshots, *self.cloud.sent_adjustments]
        if not sent:
            return
        earlier = sent[pick % len(sent)]
        if isinstance(earlier, list):
            for data in earlier:
                await self.command("inventory.snapshot", data)
        else:
            await self.command("inventory.adjust", earlier)

    async def check(self) -> None:
        """Gateway = cloud stock at what it has seen + the deltas it has not seen."""
        deltas = await self.deltas()
        expected = self.cloud.truth_at(self.cloud.seen, deltas)
        for seq, sku, d in deltas:
            if seq > self.cloud.seen:
                expected[sku] += d
        got = {s: self.inventory.item(s).on_hand for s in SKUS}
        assert got == {s: expected[s] for s in SKUS}
        # a replayed adjustment has no second effect: one movement per adjustment_id
        rows = await self.db.fetchall("SELECT ref FROM movements WHERE cause = 'adjustment'")
        folded = await self.db.fetchall("SELECT adjustment_id FROM adjustments")
        assert len(rows) == len({r[0] for r in rows}) and len(folded) == len(self.cloud.adjusted)
        reloaded = Inventory(self.db)
        await reloaded.load()
        assert {s: reloaded.item(s).on_hand for s in SKUS} == got


async def run_scenario(ops: list[tuple[Any, ...]]) -> None:
    """Run the steps on a fresh database, checking convergence after each one."""
    with tempfile.TemporaryDirectory(dir=TMP) as tmp:
        async with Database(Path(tmp) / "g.db", store_id="s", boot_id="b") as db:
            writer = asyncio.get_running_loop().create_task(db.run())
            try:
                rig = Rig(db)
                await rig.inventory.load()
                for op in ops:
                    await rig.step(op)
                    await rig.check()
            finally:
                db.request_stop()
                await writer


@example(  # two recounts at one as_of_seq, then the first replayed: must stay a no-op
    [
        ("move", "a", 2, "sale"),
        ("recount", 1, {"a": 10}, 1, random.Random(0), False),
        ("recount", 0, {"a": 20}, 1, random.Random(0), False),
        ("replay", 0),
    ]
)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps)
def test_gateway_and_cloud_converge(ops: list[tuple[Any, ...]]) -> None:
    asyncio.run(run_scenario(ops))
