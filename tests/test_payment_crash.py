"""The gateway killed at every step of a payment: after a restart every request ends final or
in_doubt, and the terminal booked it at most once.

The gateway runs as a subprocess (``STORE_GATEWAY_CRASH_AT`` picks the step); the ZVT simulator
and the till live in the test process over ``socket://`` and the real store broker, so they
outlive the gateway and see it reconnect. Also here: card data never leaks (database, WAL, logs,
MQTT) even from a terminal that sends the full PAN.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devices.sim.zvt_sim import ZvtSimulator
from tests.conftest import Broker, make_config_dict
from tests.daemon import Daemon, write_config
from tests.pos_client import PosClient, card_numbers, terminal

pytestmark = pytest.mark.broker

WARM_UP = 100  # a first payment: the terminal then has a last transaction to repeat
AMOUNT = 4242
POS_PAN = "4111111111111111"  # Luhn-valid, fed through the till's payload
SIM_PAN = "5413330089681234"  # what the simulator sends with the unmasked_pan fault


@dataclass
class Rig:
    """One simulator, one till, one config; daemons started and stopped on it."""

    tmp_path: Path
    sim: ZvtSimulator
    pos: PosClient
    config: Path

    @property
    def db_path(self) -> Path:
        return self.tmp_path / "state" / "gateway.db"

    async def start(self, **env: str) -> Daemon:
        """Start the gateway; return once it is ready, its terminal online, the store bus up."""
        daemon = Daemon(self.config)
        offset = daemon.log.stat().st_size if daemon.log.exists() else 0
        daemon.start(**env)
        for needles in (('"ready"',), ('"zvt.online',), ('"link up"', '"store_bus"')):
            await wait_log(daemon, offset, needles)
        return daemon

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db_path) as conn:
            return conn.execute(sql, params).fetchall()

    def completed(self, request_id: str) -> list[dict[str, Any]]:
        bodies = [json.loads(r[0]) for r in self.rows("SELECT body FROM events ORDER BY seq")]
        return [
            b["data"]
            for b in bodies
            if b["type"] == "payment.completed" and b["data"]["request_id"] == request_id
        ]

    def booked(self, amount: int) -> int:
        return sum(1 for e in self.sim.ledger if e.amount_minor == amount and e.result_code == 0)


async def wait_log(
    daemon: Daemon, offset: int, needles: tuple[str, ...], timeout_s: float = 15.0
) -> None:
    """Wait (without blocking the loop: the simulator lives in it) for a log line with all needles."""
    async with asyncio.timeout(timeout_s):
        while True:  # polls a subprocess's log file, bounded by the timeout
            text = daemon.log.read_text()[offset:] if daemon.log.exists() else ""
            if any(all(n in line for n in needles) for line in text.splitlines()):
                return
            if daemon.proc is not None and daemon.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {daemon.proc.returncode}:\n{text[-3000:]}")
            await asyncio.sleep(0.05)


async def exited(daemon: Daemon, timeout_s: float = 15.0) -> int:
    """Wait for the gateway process to end on its own (a crash point) or after a signal."""
    assert daemon.proc is not None
    async with asyncio.timeout(timeout_s):
        while (code := daemon.proc.poll()) is None:  # noqa: ASYNC110 - a subprocess, bounded
            await asyncio.sleep(0.05)
    return code


async def stop(daemon: Daemon) -> None:
    """SIGTERM and wait for a clean exit (the simulator keeps answering meanwhile)."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert await exited(daemon) == 0


@asynccontextmanager
async def rig(
    tmp_path: Path, store_broker: Broker, cloud_url: str = "mqtt://127.0.0.1:9", **log: Any
) -> AsyncIterator[Rig]:
    async with (
        ZvtSimulator("socket", t2_s=0.3, t3_s=1.0) as sim,
        PosClient(store_broker.port) as pos,
    ):
        raw = make_config_dict(
            tmp_path,
            cloud_url,
            store_broker.url,
            payment_terminals=[terminal(sim.endpoint)],
            logging=log or {},
        )
        yield Rig(tmp_path, sim, pos, write_config(tmp_path / "gw.toml", raw))


def purchase(rid: str, amount: int, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": rid,
        "kind": "purchase",
        "amount_minor": amount,
        "currency": "EUR",
        **extra,
    }


@pytest.mark.parametrize(
    "case",
    [
        ("payment-after-authorizing", "approve", "failed", 0),
        ("payment-after-confirming-before-ack", "approve", "failed", 0),
        ("payment-after-ack", "approve", "approved", 1),
        ("payment-before-final", "approve", "approved", 1),
        ("payment-before-final", "decline", "declined", 0),
    ],
)
async def test_killed_at_a_step_settles_once_after_restart(
    tmp_path: Path, store_broker: Broker, case: tuple[str, str, str, int]
) -> None:
    crash_at, outcome, status, booked = case
    async with rig(tmp_path, store_broker) as r:
        first = await r.start(STORE_GATEWAY_CRASH_AT=f"{crash_at}@2")  # the 2nd payment dies
        try:
            assert (await r.pos.pay(**purchase("warm-up", WARM_UP)))["status"] == "approved"
            r.sim.faults.outcome = outcome  # type: ignore[assignment]
            await r.pos.send(purchase("crash", AMOUNT))
            assert await exited(first) == -signal.SIGKILL
        finally:
            first.kill()
        assert r.pos.on("payment/result", "crash") == []  # nothing was answered before the crash
        second = await r.start()
        try:
            result = await r.pos.result("crash", timeout_s=15)  # published once recovered
            assert result["status"] == status
            again = await r.pos.pay(**purchase("crash", AMOUNT))  # the POS asks again
            assert again == result
            await stop(second)
        finally:
            second.kill()
        assert r.booked(AMOUNT) == booked <= 1
        assert [d["status"] for d in r.completed("crash")] == [status]
        assert r.rows("SELECT state FROM payments WHERE request_id = 'crash'") == [(status,)]
        assert len(r.sim.ledger) - r.booked(AMOUNT) == 1 + (outcome == "decline")


async def test_killed_while_waiting_for_the_card(tmp_path: Path, store_broker: Broker) -> None:
    async with rig(tmp_path, store_broker) as r:
        first = await r.start()
        try:
            r.sim.faults.card_delay_s, r.sim.faults.status_every_s = 3.0, 0.5
            await r.pos.send(purchase("crash", AMOUNT))
            await r.pos.wait(lambda: bool(r.pos.on("payment/status", "crash")))
        finally:
            first.kill()
        r.sim.faults.card_delay_s = 0.0
        second = await r.start()
        try:
            assert (await r.pos.result("crash", timeout_s=15))["status"] == "failed"
            await stop(second)
        finally:
            second.kill()
        assert r.booked(AMOUNT) == 0 and [d["status"] for d in r.completed("crash")] == ["failed"]


async def test_terminal_finishing_our_payment_after_restart_is_claimed(
    tmp_path: Path, store_broker: Broker
) -> None:
    """Its 04 0F arrives unsolicited after the restart: committed, acknowledged, booked once."""
    async with rig(tmp_path, store_broker) as r:
        first = await r.start(STORE_GATEWAY_CRASH_AT="payment-after-authorizing")
        try:
            await r.pos.send(purchase("crash", AMOUNT))
            assert await exited(first) == -signal.SIGKILL
        finally:
            first.kill()
        r.sim.faults.finish_at_registration = AMOUNT
        second = await r.start()
        try:
            result = await r.pos.result("crash", timeout_s=15)
            assert (result["status"], result["amount_minor"], result["trace_no"]) == (
                "approved",
                AMOUNT,
                1,
            )
            await stop(second)
        finally:
            second.kill()
        assert r.booked(AMOUNT) == 1
        assert [d["status"] for d in r.completed("crash")] == ["approved"]


async def test_no_card_number_in_database_wal_logs_or_mqtt(
    tmp_path: Path, store_broker: Broker, cloud_broker: Broker
) -> None:
    async with (
        rig(tmp_path, store_broker, cloud_broker.url, level="debug", format="json") as r,
        PosClient(cloud_broker.port, subscribe="#") as cloud,
    ):
        r.sim.faults.unmasked_pan = True  # a faulty terminal sends the full PAN in BMP 22
        daemon = await r.start()
        try:
            ok = await r.pos.pay(
                **purchase("p-1", AMOUNT, card_number=POS_PAN, note=f"pan {POS_PAN}")
            )
            assert ok["status"] == "approved" and ok["masked_pan"] == "************1234"
            bad_currency = await r.pos.pay(**purchase("p-2", 5, currency=POS_PAN))
            bad_reversal = await r.pos.pay(request_id="p-3", kind="reversal", reversal_of=POS_PAN)
            assert bad_currency["status"] == bad_reversal["status"] == "rejected"
            r.sim.faults.outcome = "decline"
            assert (await r.pos.pay(**purchase("p-4", 77)))["status"] == "declined"
            await cloud.wait(
                lambda: sum(b"payment.completed" in m.payload for m in cloud.messages) >= 2
            )
            wal = Path(f"{r.db_path}-wal")
            live = await asyncio.to_thread(
                lambda: {p.name: p.read_bytes() for p in (r.db_path, wal)}
            )
            assert live[wal.name]  # the WAL holds the recent commits
            await stop(daemon)
        finally:
            daemon.kill()
        known = (SIM_PAN, POS_PAN)
        leaks = {name: card_numbers(data, known) for name, data in live.items()}
        for path in r.db_path.parent.iterdir():
            leaks[f"after stop: {path.name}"] = card_numbers(path.read_bytes(), known)
        leaks["log"] = card_numbers(daemon.log.read_bytes(), known)
        gateway_said = [m for m in r.pos.messages if not m.topic.endswith("/payment/request")]
        leaks["store bus"] = card_numbers(b"\n".join(m.payload for m in gateway_said), known)
        leaks["cloud"] = card_numbers(b"\n".join(m.payload for m in cloud.messages), known)
        assert {k: v for k, v in leaks.items() if v} == {}
        assert b"************1234" in live[r.db_path.name] + live[wal.name]  # the data did pass
        assert any(b"************1234" in m.payload for m in cloud.messages)
