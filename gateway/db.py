"""The database: one writer connection with group commit, one reader connection.

Producers describe a unit of work (statements + outbox events) and ``await db.submit(work)``;
the single writer task takes every unit queued at that moment (bounded by
``commit_max_rows``) and commits them in ONE transaction with ``synchronous=FULL``. Only after
that commit returns are the producers' futures resolved — so nothing is ever acknowledged before
it is durable, and SQLite sees one fsync per batch instead of one per fact.

Event ``seq`` values are assigned by the writer in commit order: gapless, strictly increasing and
never reused (a failed commit hands its numbers back; a crash before commit never used them).
The envelope is serialised once, at commit, and stored: every retransmission sends those bytes.

Reads go through a second connection, which sees committed data only (WAL snapshot isolation):
nothing that might still roll back can reach the cloud.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiosqlite
import structlog

from gateway.clock import ClockStatus, now_rfc3339, uuid7
from gateway.crashpoints import crash_point
from gateway.errors import (
    AlreadyRunning,
    DatabaseOpenError,
    GatewayError,
    StorageError,
    StorageFull,
)
from gateway.schema import MIGRATIONS

log = structlog.get_logger(__name__)

Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class SeqOf:
    """Placeholder in statement parameters: the seq of this work's event number ``index``."""

    index: int = 0


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An outbox event before it has a seq."""

    type: str
    data: Mapping[str, Any]
    occurred_at: str = field(default_factory=now_rfc3339)
    clock: str = "unsynced"


Statement = tuple[str, Sequence[Any]]


@dataclass(frozen=True, slots=True)
class Work:
    """One atomic unit: business statements and the events that report them.

    ``refusable`` work (new sales, new orders) is refused with StorageFull when the database is at
    its bound; bookkeeping (acks, audit of a physical action) is not.
    """

    events: Sequence[EventDraft] = ()
    statements: Sequence[Statement] = ()
    refusable: bool = True


@dataclass(frozen=True, slots=True)
class Committed:
    """What a committed unit of work was given: the seqs of its events, in order."""

    seqs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class StorageHealth:
    """Size and error figures for health reports."""

    db_bytes: int
    used_bytes: int
    free_bytes: int
    max_bytes: int
    warning: bool
    full: bool
    last_error: str | None


@dataclass(slots=True)
class _Pending:
    work: Work
    future: asyncio.Future[Committed]


_INSERT_EVENT = "INSERT INTO events(seq, id, type, created_at, body) VALUES (?, ?, ?, ?, ?)"


class Database:
    """The gateway's SQLite database (async context manager); see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        store_id: str,
        boot_id: str,
        clock: ClockStatus | None = None,
        max_bytes: int = 1 << 30,
        min_free_bytes: int = 64 << 20,
        warn_fraction: float = 0.8,
        commit_max_rows: int = 2000,
    ) -> None:
        self.path = path
        self.store_id = store_id
        self.boot_id = boot_id
        self.clock = clock or ClockStatus()
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.warn_fraction = warn_fraction
        self.commit_max_rows = commit_max_rows
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._stopping = False
        self._last_seq = 0
        self._used_bytes = 0
        self._page_size = 4096
        self._last_error: str | None = None
        self._needs_reopen = False
        self._commit_listeners: list[Callable[[int], None]] = []
        self.commits = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._take_lock()
        try:
            self._writer = await self._connect(self.path)
            await self._migrate(self._writer)
            self._reader = await self._connect(self.path)
            await self._check_integrity()
            self._last_seq = await self.meta("last_seq")
            await self.refresh_usage()
        except (sqlite3.Error, OSError) as err:
            await self._close()
            raise DatabaseOpenError(f"cannot open database {self.path}: {err}") from err
        except BaseException:
            await self._close()
            raise
        log.info("database open", path=str(self.path), last_seq=self._last_seq)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        self._fail_queued(StorageError("database closed"))
        for conn in (self._reader, self._writer):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await conn.close()
        self._reader = self._writer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _take_lock(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as err:
            raise DatabaseOpenError(
                f"cannot create database {self.path}: {err.strerror or err}"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"another store-gateway (pid {holder}) is already using {self.path}; "
                "stop it first (systemctl stop store-gateway)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    @staticmethod
    async def _connect(path: Path) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(path, isolation_level=None)
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on the platter before we acknowledge it (NORMAL lost acked
            # commits in power-cut simulations; see docs/RELIABILITY.md).
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.execute("PRAGMA busy_timeout=5000")
            await conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            await conn.close()  # its worker thread would otherwise keep the process alive
            raise
        return conn

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        for component, steps in MIGRATIONS.items():
            async with conn.execute(
                "SELECT version FROM schema_versions WHERE component = ?", (component,)
            ) as cur:
                row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > len(steps):
                raise DatabaseOpenError(
                    f"database {self.path} has {component} schema {version}, newer than this "
                    f"gateway ({len(steps)}); upgrade the gateway"
                )
            for step in range(version, len(steps)):
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in _split_sql(steps[step]):
                        await conn.execute(stmt)
                    await conn.execute(
                        "INSERT OR REPLACE INTO schema_versions(component, version) VALUES (?, ?)",
                        (component, step + 1),
                    )
                    await conn.execute("COMMIT")
                except BaseException:
                    await conn.execute("ROLLBACK")
                    raise
                log.info("database migrated", component=component, to_version=step + 1)

    async def _check_integrity(self) -> None:
        result = await self.fetchone("PRAGMA quick_check")
        if result is None or result[0] != "ok":
            raise DatabaseOpenError(f"database {self.path} failed its integrity check: {result}")

    # --- reads --------------------------------------------------------------------------------

    @property
    def reader(self) -> aiosqlite.Connection:
        """The read connection (committed data only)."""
        if self._reader is None:
            raise StorageError("database is not open")
        return self._reader

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """All rows of a read query on committed data."""
        try:
            async with self.reader.execute(sql, params) as cur:
                rows: list[Row] = list(await cur.fetchall())  # type: ignore[arg-type]  # tuples already
                return rows
        except sqlite3.Error as err:
            raise StorageError(f"read failed: {err}") from err

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        """The first row of a read query, or None."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def meta(self, key: str) -> int:
        """An integer from the meta table (0 when absent)."""
        row = await self.fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        return int(row[0]) if row else 0

    @property
    def last_seq(self) -> int:
        """The highest event seq committed so far."""
        return self._last_seq

    def add_commit_listener(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(last_seq)`` after every commit that added events."""
        self._commit_listeners.append(listener)

    # --- writes -------------------------------------------------------------------------------

    def draft(self, type_: str, data: Mapping[str, Any]) -> EventDraft:
        """An event draft stamped now, with the clock's current trust label."""
        return EventDraft(
            type=type_, data=data, occurred_at=now_rfc3339(), clock=self.clock.label()
        )

    def enqueue(self, work: Work) -> asyncio.Future[Committed]:
        """Queue a unit of work now (commit order = enqueue order); await the future for it."""
        if self._stopping:
            raise StorageError("gateway is shutting down")
        future: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(work, future))
        return future

    async def submit(self, work: Work) -> Committed:
        """Queue a unit of work and wait until it is durably committed (or raise StorageError)."""
        return await self.enqueue(work)

    def request_stop(self) -> None:
        """Finish what is queued, then end :meth:`run`."""
        if not self._stopping:
            self._stopping = True
            self._queue.put_nowait(None)

    async def run(self) -> None:
        """The writer: group-commit whatever is queued, until stopped."""
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            rows = _cost(first.work)
            while rows < self.commit_max_rows and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    self._queue.put_nowait(None)  # stop after this batch
                    break
                batch.append(nxt)
                rows += _cost(nxt.work)
            try:
                await self._commit_batch(batch)
            except asyncio.CancelledError:
                # The commit may or may not have happened: answer "unknown", never "done".
                # A sender retries with the same idempotency key and learns the original outcome.
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(
                            StorageError("writer stopped mid-commit; outcome unknown")
                        )
                raise

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        batch = await self._admissible(batch)
        if not batch:
            return
        try:
            results, event_bytes = await self._write(batch)
        except sqlite3.IntegrityError as err:
            if len(batch) > 1:  # isolate the offender: the others deserve their commit
                for p in batch:
                    await self._commit_batch([p])
                return
            self._fail(batch, err)
            return
        except sqlite3.Error as err:
            self._fail(batch, err)
            return
        self._last_error = None
        self._used_bytes += event_bytes
        self.commits += 1
        for p, committed in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(committed)
        if any(r.seqs for r in results):
            for listener in self._commit_listeners:
                listener(self._last_seq)

    async def _admissible(self, batch: list[_Pending]) -> list[_Pending]:
        """Drop given-up units, recover the connection, refuse refusable work when full."""
        batch = [p for p in batch if not p.future.done()]  # a cancelled producer gave up
        if self._needs_reopen:
            try:
                await self._reopen_writer()
            except (sqlite3.Error, OSError, DatabaseOpenError) as err:
                self._fail(batch, sqlite3.OperationalError(f"database unavailable: {err}"))
                return []
        if self._full():
            reason = self._full_reason()
            for p in batch:
                if p.work.refusable:
                    p.future.set_exception(StorageFull(reason))
        return [p for p in batch if not p.future.done()]

    async def _write(self, batch: list[_Pending]) -> tuple[list[Committed], int]:
        conn = self._writer
        if conn is None:
            raise sqlite3.OperationalError("database is not open")
        seq = self._last_seq
        results: list[Committed] = []
        event_rows: list[Row] = []
        runs: list[tuple[str, list[Sequence[Any]]]] = []
        now = time.time()
        for p in batch:
            seqs = tuple(range(seq + 1, seq + 1 + len(p.work.events)))
            seq += len(seqs)
            results.append(Committed(seqs))
            for ev, s in zip(p.work.events, seqs, strict=True):
                event_id = uuid7()
                event_rows.append((s, event_id, ev.type, now, self._envelope(ev, s, event_id)))
            for sql, params in p.work.statements:
                resolved = tuple(seqs[x.index] if isinstance(x, SeqOf) else x for x in params)
                if runs and runs[-1][0] == sql:
                    runs[-1][1].append(resolved)
                else:
                    runs.append((sql, [resolved]))
        crash_point("before-commit")
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, plist in runs:
                await conn.executemany(sql, plist)
            if event_rows:
                await conn.executemany(_INSERT_EVENT, event_rows)
                await conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
            await conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            raise
        self._last_seq = seq
        crash_point("after-commit")
        return results, sum(len(r[4]) for r in event_rows)

    def _envelope(self, ev: EventDraft, seq: int, event_id: str) -> str:
        envelope = {
            "id": event_id,
            "seq": seq,
            "type": ev.type,
            "store_id": self.store_id,
            "occurred_at": ev.occurred_at,
            "clock": ev.clock,
            "boot_id": self.boot_id,
            "data": ev.data,
        }
        return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)

    async def _reopen_writer(self) -> None:
        """After an I/O error: new connection, integrity check, seq reloaded from disk."""
        if self._writer is not None:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await self._writer.close()
            self._writer = None
        self._writer = await self._connect(self.path)
        async with self._writer.execute("PRAGMA quick_check") as cur:
            row = await cur.fetchone()
        if row is None or row[0] != "ok":
            raise DatabaseOpenError(f"integrity check failed after I/O error: {row}")
        async with self._writer.execute("SELECT value FROM meta WHERE key = 'last_seq'") as cur:
            seq_row = await cur.fetchone()
        # A commit that reported an error may still have reached the disk: never reuse its seqs.
        self._last_seq = int(seq_row[0]) if seq_row else self._last_seq
        self._needs_reopen = False
        log.warning(
            "database reopened after an I/O error; integrity check ok", last_seq=self._last_seq
        )

    def _fail(self, batch: Iterable[_Pending], err: sqlite3.Error) -> None:
        text = str(err)
        self._last_error = text
        if "i/o error" in text.lower() or "malformed" in text.lower():
            self._needs_reopen = True
        full = "full" in text.lower()
        exc: StorageError = StorageFull(f"disk full: {text}") if full else StorageError(text)
        log.error("commit failed; nothing in it was acknowledged", error=text, full=full)
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)

    def _fail_queued(self, exc: GatewayError) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and not item.future.done():
                item.future.set_exception(exc)

    # --- size bounds --------------------------------------------------------------------------

    def _file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def _free_bytes(self) -> int:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def _full(self) -> bool:
        return self._used_bytes >= self.max_bytes or self._free_bytes() < self.min_free_bytes

    def _full_reason(self) -> str:
        if self._used_bytes >= self.max_bytes:
            return f"database holds {self._used_bytes} bytes of its {self.max_bytes}-byte bound"
        return f"less than {self.min_free_bytes} bytes free on the disk"

    async def refresh_usage(self) -> None:
        """Re-measure the bytes really in use (pages not on the freelist)."""
        pages = await _scalar(self.reader, "PRAGMA page_count")
        free = await _scalar(self.reader, "PRAGMA freelist_count")
        self._page_size = await _scalar(self.reader, "PRAGMA page_size")
        self._used_bytes = (pages - free) * self._page_size

    def health(self) -> StorageHealth:
        """Current size figures (cheap; no I/O beyond two stat calls)."""
        return StorageHealth(
            db_bytes=self._file_bytes(),
            used_bytes=self._used_bytes,
            free_bytes=self._free_bytes(),
            max_bytes=self.max_bytes,
            warning=self._used_bytes >= self.warn_fraction * self.max_bytes,
            full=self._full(),
            last_error=self._last_error,
        )


def _cost(work: Work) -> int:
    return max(1, len(work.events) + len(work.statements))


def _split_sql(script: str) -> list[str]:
    code = "\n".join(line.split("--", 1)[0] for line in script.splitlines())
    return [s.strip() for s in code.split(";") if s.strip()]


async def _scalar(conn: aiosqlite.Connection, sql: str) -> int:
    async with conn.execute(sql) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0
