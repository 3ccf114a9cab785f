"""Payment timers end to end (gateway in-process, real store broker, ZVT simulator): the daily
end-of-day on a fake local wall clock, the offline report of a terminal unreachable since
start-up, and the timed recheck of in_doubt payments."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from devices.sim.zvt_sim import ZvtSimulator
from gateway import payment_recheck, payment_schedule
from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.db import Work
from gateway.payment_records import Final, Payment, Problem, Receipt, result_body
from gateway.payments import PaymentService
from tests.conftest import Broker, free_port
from tests.gwharness import running_gateway
from tests.pos_client import PosClient, terminal
from tests.test_payments import events, eventually, purchase, row_state, simulator

pytestmark = pytest.mark.broker

ConfigFactory = Callable[..., GatewayConfig]
DAY = dt.date(2026, 3, 10)


def local(day: dt.date, hour: int, minute: int, second: float = 0.0) -> dt.datetime:
    """A moment of the system's local zone."""
    return dt.datetime.combine(day, dt.time(hour, minute)).astimezone() + dt.timedelta(
        seconds=second
    )


class FakeWall:
    """A local wall clock running at real speed from a moment the test sets (a clock step)."""

    def __init__(self) -> None:
        self.set(local(DAY, 12, 0))

    def set(self, at: dt.datetime) -> None:
        self._base, self._t0 = at, time.monotonic()

    def __call__(self) -> dt.datetime:
        return self._base + dt.timedelta(seconds=time.monotonic() - self._t0)


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> FakeWall:
    fake = FakeWall()
    monkeypatch.setattr(payment_schedule, "local_now", fake)
    return fake


@asynccontextmanager
async def running(
    config_factory: ConfigFactory,
    broker: Broker,
    endpoint: str,
    *,
    clock: str = "yes",
    online: bool = True,
    **term: Any,
) -> AsyncIterator[tuple[Gateway, PaymentService, PosClient]]:
    """A gateway with terminal pt-1 (``clock.synced`` as given) and a till client."""
    cfg = config_factory(
        store_url=broker.url,
        payment_terminals=[terminal(endpoint, **term)],
        clock={"synced": clock},
    )
    async with running_gateway(cfg) as gw, PosClient(broker.port) as pos:
        svc = next(s.component for s in gw.components if s.name == "payments")
        assert isinstance(svc, PaymentService)
        pt = svc.terminals["pt-1"]
        async with asyncio.timeout(10):
            while not gw.store_bus.link.connected:  # noqa: ASYNC110 - bounded, test only
                await asyncio.sleep(0.02)
        if online:
            assert await pt.wait_until(lambda: pt.online_after(0), 5.0)
        yield gw, svc, pos


async def eods(gw: Gateway) -> list[dict[str, Any]]:
    return [e["data"] for e in await events(gw, "payment.end_of_day")]


def sim_eods(sim: ZvtSimulator) -> int:
    return sum(1 for e in sim.ledger if e.kind == "end_of_day")


async def pay_when_free(pos: PosClient, **body: Any) -> dict[str, Any]:
    """Pay, again while the terminal is busy (with a recheck: nothing was started)."""
    for _ in range(20):
        result = await pos.pay(**body)
        if result["status"] != "busy":
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("the terminal stayed busy")


# --- daily end-of-day -----------------------------------------------------------------------------


async def test_end_of_day_runs_at_its_time_once_per_day_across_restarts(
    store_broker: Broker, config_factory: ConfigFactory, wall: FakeWall
) -> None:
    wall.set(local(DAY, 21, 0))
    async with simulator() as sim:
        async with running(config_factory, store_broker, sim.endpoint, end_of_day_at="22:00") as (
            gw, svc, pos,
        ):  # fmt: skip
            schedule = svc.schedules["pt-1"]
            await pos.pay(**purchase("p-1", 1500))
            await asyncio.sleep(0.2)
            assert await eods(gw) == [] and sim_eods(sim) == 0  # 21:00: not yet
            wall.set(local(DAY, 21, 59, 59.6))  # the clock stepped; the timer looks again
            schedule.wake()
            woken = time.monotonic()
            await sim.wait_for(lambda: sim_eods(sim) == 1)
            assert time.monotonic() - woken >= 0.35  # it waited for 22:00, it did not run early
            await eventually(lambda: _has_eods(gw, 1))
            [eod] = await eods(gw)
            assert (eod["device_id"], eod["result_code"], eod["total_minor"]) == ("pt-1", 0, 1500)
            assert "error" not in eod and schedule.last_date == DAY
            for later in (local(DAY, 22, 30), local(DAY, 21, 59, 59.9)):  # later; stepped back
                wall.set(later)
                schedule.wake()
                await asyncio.sleep(0.3)
            assert sim_eods(sim) == 1 and len(await eods(gw)) == 1
        wall.set(local(DAY, 23, 59))  # a restart late the same day: the persisted date holds
        async with running(config_factory, store_broker, sim.endpoint, end_of_day_at="22:00") as (
            gw, svc, _pos,
        ):  # fmt: skip
            schedule = svc.schedules["pt-1"]
            await asyncio.sleep(0.4)
            assert schedule.last_date == DAY and sim_eods(sim) == 1 and len(await eods(gw)) == 1
            wall.set(local(DAY + dt.timedelta(days=1), 21, 59, 59.8))  # the next day: due again
            schedule.wake()
            await eventually(lambda: _has_eods(gw, 2))
            assert sim_eods(sim) == 2 and schedule.last_date == DAY + dt.timedelta(days=1)
            row = await gw.db.fetchone("SELECT last_date FROM payment_end_of_day")
            assert row is not None and row[0] == "2026-03-11"


async def _has_eods(gw: Gateway, n: int) -> bool:
    return len(await eods(gw)) >= n


async def test_end_of_day_is_postponed_while_the_clock_is_unsynced(
    store_broker: Broker,
    config_factory: ConfigFactory,
    wall: FakeWall,
    monkeypatch: pytest.MonkeyPatch,
    log_output: list[dict[str, Any]],
) -> None:
    monkeypatch.setattr(payment_schedule, "UNSYNCED_RETRY_S", 0.1)
    wall.set(local(DAY, 22, 0, 5))  # due already
    async with (
        simulator() as sim,
        running(config_factory, store_broker, sim.endpoint, clock="no", end_of_day_at="22:00")
        as (gw, svc, _pos),
    ):  # fmt: skip
        await asyncio.sleep(0.5)  # about five looks at the unsynced clock
        assert (
            sim_eods(sim) == 0 and await eods(gw) == [] and svc.schedules["pt-1"].last_date is None
        )
        postponed = [e for e in log_output if e["event"] == "payment.end_of_day_postponed"]
        assert len(postponed) == 1 and postponed[0]["reason"] == "clock-unsynced"  # once a day
        monkeypatch.setattr(gw.clock, "synced", lambda: True)  # NTP synced
        await eventually(lambda: _has_eods(gw, 1), 5.0)
        assert sim_eods(sim) == 1 and (await eods(gw))[0]["result_code"] == 0


async def test_end_of_day_waits_for_a_running_payment(
    store_broker: Broker, config_factory: ConfigFactory, wall: FakeWall
) -> None:
    wall.set(local(DAY, 21, 0))
    async with (
        simulator() as sim,
        running(config_factory, store_broker, sim.endpoint, end_of_day_at="22:00")
        as (gw, svc, pos),
    ):  # fmt: skip
        sim.faults.card_delay_s = 1.0
        await pos.send(purchase("p-slow", 800))
        await pos.wait(lambda: bool(pos.on("payment/status", "p-slow")))  # in the exchange
        wall.set(local(DAY, 22, 0, 1))
        svc.schedules["pt-1"].wake()
        await asyncio.sleep(0.3)
        assert sim_eods(sim) == 0 and await row_state(gw, "p-slow") == "authorizing"
        assert (await pos.result("p-slow"))["status"] == "approved"
        await eventually(lambda: _has_eods(gw, 1), 5.0)
        assert [e.kind for e in sim.ledger] == ["authorization", "end_of_day"]
        [eod] = await eods(gw)
        assert eod["total_minor"] == 800  # the payment is in the day's total
        kinds = [e["type"] for e in await events(gw, "payment.")]
        assert kinds == ["payment.completed", "payment.end_of_day"]


# --- terminal unreachable since start-up ----------------------------------------------------------


async def test_terminal_unreachable_at_start_is_reported_offline_once(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    port = free_port()
    async with running(
        config_factory, store_broker, f"socket://127.0.0.1:{port}", online=False
    ) as (gw, svc, _pos):
        grace_s = 1 + 3 * 0.3 + 0.5  # connect_timeout_s + 3 T2 + T3 of FAST_TERMINAL
        started = time.monotonic()
        await eventually(lambda: _has_status(gw, 1), 5.0)
        assert time.monotonic() - started <= grace_s + 0.5
        await asyncio.sleep(1.5)  # several more failed attempts: no repetition
        [status] = [e["data"] for e in await events(gw, "device.status")]
        assert status["device_id"] == "pt-1" and status["kind"] == "payment"
        assert status["state"] == "offline" and "start-up" in status["detail"]
        async with ZvtSimulator("socket", port=port, t2_s=0.3, t3_s=1.0):  # plugged in
            pt = svc.terminals["pt-1"]
            assert await pt.wait_until(lambda: pt.online_after(0), 10.0)
            await eventually(lambda: _has_status(gw, 2), 5.0)
            states = [e["data"]["state"] for e in await events(gw, "device.status")]
            assert states == ["offline", "online"]


async def _has_status(gw: Gateway, n: int) -> bool:
    return len(await events(gw, "device.status")) >= n


# --- in_doubt recheck by timer --------------------------------------------------------------------


async def _seed_in_doubt(gw: Gateway, rid: str, amount: int, trace_no: int) -> None:
    """An in_doubt payment as an earlier run left it: its 04 0F committed, its booking unknown."""
    receipt = Receipt(result_code=0, amount_minor=amount, trace_no=trace_no, receipt_no=trace_no)
    payment = Payment(rid, "pos-1", "pt-1", "purchase", amount, "EUR", receipt=receipt)
    problem = Problem("terminal-unreachable", "the terminal did not come back within T4")
    body = result_body(payment, Final("in_doubt", error=problem, recheck=True))
    sql = (
        "INSERT INTO payments(request_id, till, device_id, kind, amount_minor, currency, receipt,"
        " state, result, recheck, created_at, updated_at) VALUES (?, 'pos-1', 'pt-1', 'purchase',"
        " ?, 'EUR', ?, 'in_doubt', ?, 1, ?, ?)"
    )
    now = time.time()
    params = (rid, amount, receipt.to_json(), json.dumps(body), now, now)
    await gw.db.submit(Work(statements=[(sql, params)]))


async def test_in_doubt_is_settled_by_the_recheck_timer(
    store_broker: Broker, config_factory: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(payment_recheck, "RECHECK_IN_DOUBT_S", 0.4)
    async with simulator() as sim:
        async with running(config_factory, store_broker, sim.endpoint) as (gw, _svc, _pos):
            await _seed_in_doubt(gw, "p-doubt", 700, trace_no=50)
        async with running(config_factory, store_broker, sim.endpoint) as (gw, svc, pos):
            repeats = lambda: sum(1 for a in sim.received if (a.cls, a.instr) == (0x06, 0x20))  # noqa: E731
            # asked when the terminal came online: it has no last transaction, nothing placed
            await sim.wait_for(lambda: repeats() >= 1)
            assert await row_state(gw, "p-doubt") == "in_doubt"
            assert "p-doubt" in svc.book.doubtful
            await sim.wait_for(lambda: repeats() >= 2)  # the timer asks again meanwhile
            assert await row_state(gw, "p-doubt") == "in_doubt"
            # a later transaction: the terminal's last one is now older than ours (trace 50)
            assert (await pay_when_free(pos, **purchase("p-1", 100)))["status"] == "approved"
            connections = sim.connections
            await eventually(lambda: _has_resolved(gw), 5.0)
            resolved = [e["data"] for e in await events(gw, "payment.resolved")]
            assert resolved == [
                {"request_id": "p-doubt", "status": "failed", "resolved_by": "terminal"}
            ]
            assert sim.connections == connections == 2  # no reconnect: the timer asked
            assert await row_state(gw, "p-doubt") == "failed" and not svc.book.doubtful


async def _has_resolved(gw: Gateway) -> bool:
    return bool(await events(gw, "payment.resolved"))
