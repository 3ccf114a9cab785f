"""Power loss, simulated in CI: an SQLite VFS that keeps every write in memory until ``xSync``.

The writer subprocess opens the database through :class:`PowerCutVfs` (apsw): a write lands in
the file only when SQLite syncs it, as with a disk cache that loses its contents when the power
goes. The writer commits groups of outbox events the way the gateway's writer does (one
``BEGIN IMMEDIATE`` … ``COMMIT`` per batch of many rows, ``meta.last_seq`` updated in the same
transaction) and prints each batch's last seq only after ``COMMIT`` returned: that line is the
acknowledgement. SIGKILL is the power cut — the unsynced writes die with the process.

After every cut the file is opened with the stdlib driver (as the gateway would after the
reboot): the integrity check must pass and every acknowledged seq must be there, gapless.

What this validates: the durability contract of the schema (``gateway.schema``) and of the very
pragmas ``gateway.db.Database._connect`` sets (read from its source, so a change there is tested
here), under the gateway's commit pattern. It does not run the aiosqlite plumbing: aiosqlite is
the same SQLite library behind a thread, and the acknowledge-after-commit order of
``gateway.db`` is covered by the crash-point tests. The negative control swaps
``synchronous=FULL`` for ``NORMAL`` and must lose acknowledged commits, so the harness can fail.

Needs ``apsw`` (the stdlib ``sqlite3`` module cannot register a VFS); skipped without it.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import re
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.db import Database
from gateway.schema import CORE

REPO = Path(__file__).resolve().parent.parent
VFS_NAME = "powercut"


def gateway_pragmas() -> list[str]:
    """The PRAGMA statements the gateway runs on every connection, read from gateway/db.py."""
    return re.findall(r'"(PRAGMA [^"]+)"', inspect.getsource(Database._connect))


# --- the writer (runs in a subprocess with apsw) ----------------------------------------------


def _make_vfs() -> Any:
    import apsw  # noqa: PLC0415 - only the writer subprocess needs it

    class PowerCutFile(apsw.VFSFile):  # type: ignore[misc]
        """Writes and truncations wait in memory until xSync puts them on the disk."""

        def __init__(self, name: Any, flags: Any) -> None:
            super().__init__("", name, flags)
            self.ops: list[tuple[int, bytes | None]] = []  # (offset, data) or (size, None)
            self.size = int(super().xFileSize())
            self.floor = self.size  # disk bytes at or past this offset were truncated away

        def xWrite(self, data: bytes, offset: int) -> None:
            self.ops.append((offset, bytes(data)))
            self.size = max(self.size, offset + len(data))

        def xTruncate(self, newsize: int) -> None:
            self.ops.append((newsize, None))
            self.size = newsize
            self.floor = min(self.floor, newsize)

        def xFileSize(self) -> int:
            return self.size

        def xRead(self, amount: int, offset: int) -> bytes:
            buf = bytearray(amount)
            disk_end = min(self.floor, offset + amount)
            if disk_end > offset:
                disk = super().xRead(disk_end - offset, offset)
                buf[: len(disk)] = disk
            for at, data in self.ops:
                if data is None:
                    if at < offset + amount:
                        cut = max(at - offset, 0)
                        buf[cut:] = bytes(amount - cut)
                    continue
                lo, hi = max(at, offset), min(at + len(data), offset + amount)
                if lo < hi:
                    buf[lo - offset : hi - offset] = data[lo - at : hi - at]
            return bytes(buf[: max(0, min(amount, self.size - offset))])

        def xSync(self, flags: int) -> None:
            for at, data in self.ops:
                if data is None:
                    super().xTruncate(at)
                else:
                    super().xWrite(data, at)
            self.ops.clear()
            self.floor = self.size
            super().xSync(flags)

    class PowerCutVfs(apsw.VFS):  # type: ignore[misc]
        """The default VFS with :class:`PowerCutFile` files."""

        def __init__(self) -> None:
            super().__init__(VFS_NAME, "")

        def xOpen(self, name: Any, flags: Any) -> PowerCutFile:
            return PowerCutFile(name, flags)

    return PowerCutVfs()


def writer_main(db_path: str, synchronous: str, seed: int) -> None:
    """Commit batches of events forever; print the last seq of each batch after its COMMIT."""
    import apsw  # noqa: PLC0415 - only the writer subprocess needs it

    vfs = _make_vfs()
    conn = apsw.Connection(db_path, vfs=VFS_NAME)
    for pragma in gateway_pragmas():
        is_sync = pragma.lower().startswith("pragma synchronous")
        conn.execute(f"PRAGMA synchronous={synchronous}" if is_sync else pragma)
    rng = random.Random(seed)
    seq = int(next(conn.execute("SELECT value FROM meta WHERE key = 'last_seq'"))[0])
    out = sys.stdout
    while True:
        rows = []
        for _ in range(rng.randint(20, 200)):
            seq += 1
            body = json.dumps({"seq": seq, "data": {"pad": "x" * rng.randint(50, 400)}})
            rows.append((seq, f"ev-{seq}", "test.event", time.time(), body))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO events(seq, id, type, created_at, body) VALUES (?, ?, ?, ?, ?)", rows
        )
        conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
        conn.execute("COMMIT")
        out.write(f"{seq}\n")  # the acknowledgement, only after COMMIT returned
        out.flush()
    del vfs


# --- the harness --------------------------------------------------------------------------------


def _create(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(CORE[0])
    conn.close()


def _cut(db: Path, synchronous: str, seed: int, acks_before_cut: int) -> int:
    """Run the writer until ``acks_before_cut`` acks, pull the plug; the highest acked seq."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_power_loss", str(db), synchronous, str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])},
        cwd=REPO,
    )
    assert proc.stdout is not None
    acked = 0
    acks = 0
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 30
    try:
        while acks < acks_before_cut:
            assert time.monotonic() < deadline, "the writer is too slow"
            if not sel.select(timeout=1.0):
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                continue
            line = proc.stdout.readline()
            assert line, f"writer ended: {proc.stderr.read().decode() if proc.stderr else ''}"
            acked = int(line)
            acks += 1
    finally:
        proc.send_signal(signal.SIGKILL)  # the power cut
        rest, err = proc.communicate(timeout=10)
        sel.close()
    for line in rest.split():  # acks that were sent before the cut count too
        acked = max(acked, int(line))
    assert proc.returncode == -signal.SIGKILL, err.decode()
    return acked


def _durable(db: Path) -> int:
    """After the 'reboot': integrity ok, seqs gapless; the last durable seq."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        last = int(conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0])
        count, top = conn.execute("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM events").fetchone()
    finally:
        conn.close()
    assert (count, top) == (last, last), f"events not gapless 1..{last}: {count} rows, max {top}"
    return last


def run_power_cuts(tmp_path: Path, synchronous: str, cuts: int, seed: int) -> tuple[int, int]:
    """``cuts`` power cuts on one database; (acknowledged commits lost, events acked)."""
    db = tmp_path / f"cut-{synchronous}.db"
    _create(db)
    rng = random.Random(seed)
    lost = acked_total = durable = 0
    for i in range(cuts):
        acked = _cut(db, synchronous, seed * 1000 + i, rng.randint(3, 40))
        acked_total += acked - durable
        durable = _durable(db)
        lost += max(0, acked - durable)
    return lost, acked_total


@pytest.fixture
def _needs_apsw() -> None:
    pytest.importorskip(
        "apsw", reason="power-loss simulation needs apsw (test extra: apsw>=3.46) for its VFS"
    )


def test_the_gateway_connection_pragmas_are_what_this_test_exercises() -> None:
    pragmas = [p.replace(" ", "").lower() for p in gateway_pragmas()]
    assert "pragmajournal_mode=wal" in pragmas
    assert "pragmasynchronous=full" in pragmas


@pytest.mark.usefixtures("_needs_apsw")
def test_power_cuts_lose_no_acknowledged_commit_with_the_gateway_pragmas(tmp_path: Path) -> None:
    lost, acked = run_power_cuts(tmp_path, "FULL", cuts=6, seed=7)
    print(f"power loss FULL: 6 cuts, {acked} events acked, lost={lost}")
    assert acked > 0
    assert lost == 0


@pytest.mark.usefixtures("_needs_apsw")
def test_negative_control_synchronous_normal_loses_acknowledged_commits(tmp_path: Path) -> None:
    lost, acked = run_power_cuts(tmp_path, "NORMAL", cuts=4, seed=7)
    print(f"power loss NORMAL: 4 cuts, {acked} events acked, lost={lost}")
    assert lost > 0, "the simulation must be able to lose unsynced commits"


if __name__ == "__main__":
    writer_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
