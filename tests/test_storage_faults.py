"""Storage faults: the size bound, a really full disk (tmpfs), an injected I/O error.

In every case: no acknowledgement for a failed commit, nothing acknowledged is lost, seq stays
gapless, and the database recovers when the fault goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.db import Database, Work
from gateway.errors import StorageError, StorageFull
from gateway.outbox import Outbox
from tests.gwharness import emit, running_gateway


@contextlib.asynccontextmanager
async def open_db(path: Path, **kwargs: Any) -> AsyncIterator[Database]:
    async with Database(path, store_id="s", boot_id="b", **kwargs) as db:
        writer = asyncio.get_running_loop().create_task(db.run())
        try:
            yield db
        finally:
            db.request_stop()
            await writer


async def commit_until_error(
    db: Database, *, pad: int, limit: int = 100_000
) -> tuple[list[int], Exception]:
    """Commit one event at a time until the database refuses; returns acknowledged seqs."""
    acked: list[int] = []
    for i in range(limit):
        try:
            result = await db.submit(Work(events=[db.draft("fill", {"i": i, "pad": "x" * pad})]))
        except StorageError as err:
            return acked, err
        acked.extend(result.seqs)
    raise AssertionError("the database never refused")


async def assert_intact(db: Database, acked: list[int]) -> None:
    rows = await db.fetchall("SELECT seq FROM events ORDER BY seq")
    seqs = [int(r[0]) for r in rows]
    assert set(acked) <= set(seqs)
    assert seqs == list(range(1, len(seqs) + 1))
    assert seqs[-1] == db.last_seq
    check = await db.fetchone("PRAGMA integrity_check")
    assert check is not None and check[0] == "ok"


async def test_size_bound_refuses_new_facts_but_not_bookkeeping(tmp_path: Path) -> None:
    async with open_db(tmp_path / "g.db", max_bytes=256 * 1024, warn_fraction=0.5) as db:
        acked, err = await commit_until_error(db, pad=2000)
        assert isinstance(err, StorageFull)
        assert "bound" in str(err)
        health = db.health()
        assert health.full and health.warning
        # bookkeeping (acks, audit of a physical action) is never refused for size
        book = await db.submit(Work(events=[db.draft("device.status", {"x": 1})], refusable=False))
        assert book.seqs == (acked[-1] + 1,)
        await assert_intact(db, [*acked, *book.seqs])
        # the backend acks everything; pruning frees the space; new facts are accepted again
        outbox = Outbox(db)
        await outbox.load()
        assert outbox.ack(db.last_seq)
        assert await outbox.prune(retention_s=0, force=True) > 0
        assert not db.health().full
        again = await db.submit(Work(events=[db.draft("after", {})]))
        assert again.seqs == (db.last_seq,)
        assert again.seqs[0] == book.seqs[0] + 1


async def test_free_space_reserve_refuses(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    async with open_db(tmp_path / "g.db", min_free_bytes=free + (1 << 40)) as db:
        with pytest.raises(StorageFull, match="free on the disk"):
            await db.submit(Work(events=[db.draft("x", {})]))
        assert db.last_seq == 0


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_disk_really_full_then_space_returns(small_tmpfs: Path) -> None:
    async with open_db(small_tmpfs / "g.db", min_free_bytes=0) as db:
        acked, err = await commit_until_error(db, pad=3000)
        assert isinstance(err, StorageError)
        assert "full" in str(err).lower()
        assert len(acked) > 10
        assert db.health().last_error is not None
        with pytest.raises(StorageError):  # still full: refused again, never silently dropped
            await db.submit(Work(events=[db.draft("fill", {"i": -1, "pad": "x" * 3000})]))
        await asyncio.to_thread(
            subprocess.run, ["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True
        )
        ok = await db.submit(Work(events=[db.draft("after", {})]))
        assert ok.seqs == (acked[-1] + 1,)  # gapless across the outage
        await assert_intact(db, [*acked, *ok.seqs])
    async with open_db(small_tmpfs / "g.db") as db:  # and after a restart
        await assert_intact(db, [*acked, *ok.seqs])


async def test_injected_io_error_on_commit(
    tmp_path: Path, log_output: list[dict[str, Any]]
) -> None:
    async with open_db(tmp_path / "g.db") as db:
        first = await db.submit(Work(events=[db.draft("a", {})]))
        writer = db._writer
        assert writer is not None
        real_execute = writer.execute
        fail = {"armed": True}

        def faulty_execute(sql: str, *args: Any) -> Any:
            if fail["armed"] and sql == "COMMIT":
                fail["armed"] = False
                raise sqlite3.OperationalError("disk I/O error")
            return real_execute(sql, *args)

        writer.execute = faulty_execute  # type: ignore[method-assign]
        with pytest.raises(StorageError, match="disk I/O error"):
            await db.submit(Work(events=[db.draft("b", {})]))
        assert db.health().last_error == "disk I/O error"
        after = await db.submit(Work(events=[db.draft("c", {})]))
        assert after.seqs == (first.seqs[0] + 1,)  # the failed batch never used its seq
        assert db._writer is not writer  # reopened
        assert any("reopened after an I/O error" in e["event"] for e in log_output)
        await assert_intact(db, [*first.seqs, *after.seqs])
        assert db.health().last_error is None


async def test_health_raises_the_storage_alert_before_anything_is_refused(
    config_factory: Any,
) -> None:
    cfg = config_factory(storage={"max_bytes": 1 << 20, "warn_fraction": 0.2})
    async with running_gateway(cfg) as gw:
        disk = (await gw.health())["disk"]
        assert disk["warning"] is False and disk["max_bytes"] == 1 << 20
        while not gw.db.health().warning:
            await gw.db.submit(Work(events=[gw.db.draft("fill", {"pad": "x" * 4000})] * 20))
        disk = (await gw.health())["disk"]
        assert disk["warning"] is True and disk["full"] is False
        assert await emit(gw, 1)  # warned, still accepting new facts
