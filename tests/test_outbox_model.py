"""Stateful property test of the outbox against a model of what was acknowledged.

Rules: produce (commit and acknowledge a unit of work), produce-then-crash (queued but never
acknowledged), crash/restart (reopen the database, lose every in-memory watermark), drain
(read from the cursor as the drainer does, deliver to a model backend), PUBACK, backend ack,
replay, prune. Invariants: every acknowledged event survives every crash with identical bytes;
seq is gapless and never reused; the backend never sees a seq or an id with different content;
watermarks only move forward and never pass the last seq.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.db import Database, Work
from gateway.drain import make_batches
from gateway.outbox import Outbox


class OutboxMachine(RuleBasedStateMachine):
    """The outbox under produce/crash/drain/ack/replay."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-model-"))
        self.acknowledged: dict[int, str] = {}  # seq → body, for every acknowledged event
        self.backend: dict[int, str] = {}  # seq → body as first delivered
        self.backend_ids: dict[str, str] = {}
        self.backend_acked = 0
        self.cursor = 1
        self.sent_max = 0
        self.db: Database | None = None
        self.outbox: Outbox | None = None
        self.writer: asyncio.Task[None] | None = None
        self.boots = 0
        self._open()

    def _run(self, coro: object) -> object:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    def _open(self) -> None:
        async def go() -> None:
            self.boots += 1
            self.db = Database(self.dir / "g.db", store_id="s", boot_id=f"boot-{self.boots}")
            await self.db.__aenter__()
            self.outbox = Outbox(self.db)
            await self.outbox.load()
            self.writer = self.loop.create_task(self.db.run())

        self._run(go())
        assert self.outbox is not None
        self.cursor = self.outbox.acked_through + 1

    def _crash(self) -> None:
        """Lose everything in memory; only what was committed stays."""

        async def go() -> None:
            assert self.db is not None and self.writer is not None
            self.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.writer
            await self.db.__aexit__(None, None, None)

        self._run(go())

    def teardown(self) -> None:
        self._crash()
        self.loop.close()

    # --- rules --------------------------------------------------------------------------------

    @rule(n=st.integers(1, 20), size=st.integers(0, 300))
    def produce(self, n: int, size: int) -> None:
        async def go() -> None:
            assert self.db is not None
            works = [
                Work(events=[self.db.draft("t", {"i": i, "pad": "é" * size})]) for i in range(n)
            ]
            results = await asyncio.gather(*(self.db.submit(w) for w in works))
            seqs = [s for r in results for s in r.seqs]
            rows = await self.db.fetchall(
                "SELECT seq, body FROM events WHERE seq BETWEEN ? AND ?", (min(seqs), max(seqs))
            )
            for seq, body in rows:
                self.acknowledged[int(seq)] = str(body)

        self._run(go())

    @rule(n=st.integers(1, 5))
    def queued_then_crash(self, n: int) -> None:
        """Work queued but not committed when the process dies is never acknowledged."""
        futures: list[asyncio.Future[object]] = []

        async def go() -> None:
            assert self.db is not None
            for i in range(n):
                futures.append(self.db.enqueue(Work(events=[self.db.draft("lost", {"i": i})])))  # type: ignore[arg-type]

        self._run(go())
        self._crash()
        for fut in futures:  # never acknowledged: every one of them failed
            assert fut.done() and not fut.cancelled() and fut.exception() is not None
        self._open()

    @rule()
    def crash_and_restart(self) -> None:
        self._crash()
        self._open()

    @rule(limit=st.integers(1, 50), max_batch=st.integers(1, 10))
    def drain(self, limit: int, max_batch: int) -> None:
        async def go() -> None:
            assert self.outbox is not None
            rows = await self.outbox.fetch_from(self.cursor, limit)
            for batch in make_batches(rows, max_batch):
                for env in json.loads(batch.payload)["events"]:
                    body = json.dumps(env, separators=(",", ":"), ensure_ascii=False)
                    first = self.backend.setdefault(env["seq"], body)
                    assert first == body, f"seq {env['seq']} delivered with different content"
                    assert self.backend_ids.setdefault(env["id"], body) == body
                self.outbox.mark_sent(batch.last_seq)
                self.sent_max = max(self.sent_max, batch.last_seq)
                self.cursor = batch.last_seq + 1

        self._run(go())

    @rule()
    def drain_everything_and_ack(self) -> None:
        """A healthy link: everything held is delivered and acknowledged."""
        assert self.db is not None
        while self.cursor <= self.db.last_seq:
            before = self.cursor
            self.drain(limit=50, max_batch=10)
            if self.cursor == before:
                break
        self.backend_acks()

    @rule()
    def backend_acks(self) -> None:
        contiguous = self.backend_acked
        while contiguous + 1 in self.backend:
            contiguous += 1
        assert self.outbox is not None
        self.outbox.ack(contiguous)
        self.backend_acked = max(self.backend_acked, contiguous)

    @rule()
    def persist(self) -> None:
        assert self.outbox is not None
        self._run(self.outbox.persist())

    @rule(data=st.data())
    @precondition(lambda self: self.db is not None and self.db.last_seq > 0)
    def replay(self, data: st.DataObject) -> None:
        assert self.db is not None
        self.cursor = data.draw(st.integers(1, self.db.last_seq))

    @rule()
    def prune_acked(self) -> None:
        assert self.outbox is not None
        self._run(self.outbox.prune(retention_s=0, force=True))

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def acknowledged_events_survive_unchanged(self) -> None:
        assert self.db is not None and self.outbox is not None
        rows = dict(self._run(self.db.fetchall("SELECT seq, body FROM events")))  # type: ignore[call-overload]
        for seq, body in self.acknowledged.items():
            if seq in rows:
                assert rows[seq] == body, f"seq {seq} changed"
            else:  # only acked events may be pruned
                assert seq <= self.outbox.acked_through or seq <= self._persisted_acked()

    def _persisted_acked(self) -> int:
        assert self.db is not None
        return int(self._run(self.db.meta("acked_through")))  # type: ignore[call-overload]

    @invariant()
    def seq_is_gapless_and_never_reused(self) -> None:
        assert self.db is not None
        last = self.db.last_seq
        assert all(1 <= s <= last for s in self.acknowledged)
        seqs = [r[0] for r in self._run(self.db.fetchall("SELECT seq FROM events ORDER BY seq"))]  # type: ignore[attr-defined]
        if seqs:
            assert seqs == list(range(seqs[0], seqs[-1] + 1))
            assert seqs[-1] == last
        unacked_min = self.outbox.acked_through + 1 if self.outbox else 1
        assert all(s in seqs for s in range(max(unacked_min, 1), last + 1))

    @invariant()
    def watermarks_are_sane(self) -> None:
        assert self.outbox is not None and self.db is not None
        assert (
            0 <= self.outbox.acked_through <= self.outbox.sent_through
            or self.outbox.sent_through == 0
        )
        assert self.outbox.acked_through <= self.db.last_seq


OutboxMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_outbox_model = OutboxMachine.TestCase
