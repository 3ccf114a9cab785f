"""SIGKILL the daemon at named crash points and at random times; nothing committed is lost.

Workload: cloud commands (each yields one committed ``command.result``); a backend that retries
commands without a result, as a real backend does. After the crash and a restart: every
committed event reaches the backend byte-identical, seq is gapless, no seq or id is reused, and
every command has exactly one first outcome.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from pathlib import Path

import pytest

from gateway.backend_sim import RecordingBackend
from tests.conftest import Broker, make_config_dict
from tests.daemon import Daemon, write_config

pytestmark = pytest.mark.broker

COMMANDS = 12


async def drive(backend: RecordingBackend, ids: list[str], *, until_s: float = 40.0) -> None:
    """Send every command until it has a result (resending the ones still unanswered)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + until_s
    while loop.time() < deadline:
        missing = [c for c in ids if c not in backend.record.results()]
        if not missing:
            return
        for cid in missing:
            await backend.send_command("events.replay", {"from_seq": 10**9}, command_id=cid)
        try:
            await backend.wait_until(lambda r: all(c in r.results() for c in ids), timeout_s=2.0)
        except TimeoutError:
            continue
    raise AssertionError(
        f"commands without result: {[c for c in ids if c not in backend.record.results()]}"
    )


def check_database_against_backend(
    db_path: Path, backend: RecordingBackend, ids: list[str]
) -> None:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT seq, id, body FROM events ORDER BY seq").fetchall()
        last = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0]
        remembered = dict(conn.execute("SELECT id, result FROM commands").fetchall())
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    seqs = [r[0] for r in rows]
    assert seqs == list(range(1, last + 1)), "seq must be gapless from 1"
    rec = backend.record
    assert rec.changed_ids == [] and rec.seq_reused == []
    for seq, event_id, body in rows:
        if seq not in rec.events:
            # committed during the final shutdown: still held, delivered at the next start
            assert seq > rec.contiguous, (
                f"committed seq {seq} ({body[:120]}) never reached the backend"
            )
            continue
        got = rec.events[seq]
        assert got["id"] == event_id
        assert json.dumps(got, sort_keys=True) == json.dumps(json.loads(body), sort_keys=True)
    results = rec.results()
    for cid in ids:
        assert cid in remembered
        firsts = [r for r in results[cid] if not r["duplicate"]]
        assert len(firsts) == 1, f"{cid} applied {len(firsts)} times"
        for r in results[cid]:
            assert r["status"] == firsts[0]["status"]


async def run_crash_scenario(
    tmp_path: Path, cloud: Broker, store: Broker, crash_env: str | None, kill_after_s: float | None
) -> int:
    raw = make_config_dict(tmp_path, cloud.url, store.url)
    raw["cloud"]["resend_after_s"] = 1
    cfg = write_config(tmp_path / "gw.toml", raw)
    daemon = Daemon(cfg)
    ids = [f"c-{i:03d}" for i in range(COMMANDS)]
    try:
        async with RecordingBackend("127.0.0.1", cloud.port, "store-0042") as backend:
            daemon.start(**({"STORE_GATEWAY_CRASH_AT": crash_env} if crash_env else {}))
            await asyncio.to_thread(daemon.wait_log, '"link up"')
            for cid in ids:
                await backend.send_command("events.replay", {"from_seq": 10**9}, command_id=cid)
            if kill_after_s is not None:
                await asyncio.sleep(kill_after_s)
                daemon.kill()
            code = await asyncio.to_thread(daemon.wait, 30)
            assert code == -9, "the daemon should have been SIGKILLed"
            daemon.start()  # restart, no crash point
            await asyncio.to_thread(daemon.wait_log, '"ready"')
            await drive(backend, ids)
            db_path = Path(raw["storage"]["path"])
            await backend.wait_until(lambda r: r.contiguous >= _last_seq(db_path), timeout_s=20)
            assert daemon.terminate() == 0
            check_database_against_backend(db_path, backend, ids)
            return _last_seq(db_path)
    finally:
        daemon.kill()


def _last_seq(db_path: Path) -> int:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("point", ["before-commit@4", "after-commit@4", "after-publish@3"])
async def test_named_crash_point(
    tmp_path: Path, cloud_broker: Broker, store_broker: Broker, point: str
) -> None:
    last = await run_crash_scenario(tmp_path, cloud_broker, store_broker, point, None)
    assert last >= COMMANDS


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_sigkill(
    tmp_path: Path, cloud_broker: Broker, store_broker: Broker, seed: int
) -> None:
    kill_after = random.Random(seed).uniform(0.0, 0.15)
    last = await run_crash_scenario(tmp_path, cloud_broker, store_broker, None, kill_after)
    assert last >= COMMANDS
