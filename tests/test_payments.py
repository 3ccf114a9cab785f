"""Card payments end to end: a till on the real store broker, the gateway in-process, the ZVT
simulator speaking the real bytes over ``socket://``. Outcomes are read from the simulator's
ledger and the gateway's committed events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from devices.sim.zvt_sim import ZvtSimulator
from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.linkstate import DeviceState
from gateway.payments import PaymentService
from tests.conftest import Broker, free_port
from tests.gwharness import running_gateway
from tests.pos_client import PosClient, terminal

pytestmark = pytest.mark.broker

ConfigFactory = Callable[..., GatewayConfig]


@asynccontextmanager
async def simulator() -> AsyncIterator[ZvtSimulator]:
    async with ZvtSimulator("socket", t2_s=0.3, t3_s=1.0) as sim:
        yield sim


@asynccontextmanager
async def gateway(
    config_factory: ConfigFactory,
    broker: Broker,
    endpoint: str,
    *,
    online: bool = True,
    **term: Any,
) -> AsyncIterator[tuple[Gateway, PaymentService, PosClient]]:
    """A running gateway with one terminal pt-1 (tills pos-1, pos-2) and a till client."""
    cfg = config_factory(store_url=broker.url, payment_terminals=[terminal(endpoint, **term)])
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


async def events(gw: Gateway, prefix: str = "payment.") -> list[dict[str, Any]]:
    rows = await gw.db.fetchall(
        "SELECT body FROM events WHERE type LIKE ? ORDER BY seq", (prefix + "%",)
    )
    return [json.loads(r[0]) for r in rows]


async def has_events(gw: Gateway, type_: str) -> bool:
    return bool(await events(gw, type_))


async def completed(gw: Gateway, request_id: str) -> list[dict[str, Any]]:
    return [
        e["data"]
        for e in await events(gw, "payment.completed")
        if e["data"]["request_id"] == request_id
    ]


async def row_state(gw: Gateway, request_id: str) -> str | None:
    row = await gw.db.fetchone("SELECT state FROM payments WHERE request_id = ?", (request_id,))
    return None if row is None else str(row[0])


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Wait until the committed state satisfies ``check`` (bounded)."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - bounded poll of the database
            await asyncio.sleep(0.02)


def booked(sim: ZvtSimulator, amount: int) -> list[Any]:
    return [e for e in sim.ledger if e.amount_minor == amount and e.result_code == 0]


def purchase(rid: str, amount: int, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": rid,
        "kind": "purchase",
        "amount_minor": amount,
        "currency": "EUR",
        **extra,
    }


# --- flows ----------------------------------------------------------------------------------------


async def test_approved_purchase_relays_steps_and_commits_before_answering(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with (
        simulator() as sim,
        gateway(config_factory, store_broker, sim.endpoint) as (gw, _svc, pos),
    ):
        result = await pos.pay(**purchase("p-1", 1234))
        assert result == {
            "request_id": "p-1", "status": "approved", "amount_minor": 1234, "currency": "EUR",
            "result_code": 0, "auth_code": "A1B2C3", "masked_pan": "541333******1234",
            "card_brand": "mastercard", "receipt_no": 1, "trace_no": 1,
        }  # fmt: skip
        steps = [s["step"] for s in pos.on("payment/status", "p-1")]
        assert steps == ["insert_card", "enter_pin", "please_wait", "remove_card"]
        assert set(pos.topics("payment/status")) == {"store/v1/pos/pos-1/payment/status"}
        assert [(e.kind, e.amount_minor) for e in sim.ledger] == [("authorization", 1234)]
        [data] = await completed(gw, "p-1")  # committed before the answer went out
        assert data == {
            "request_id": "p-1", "terminal_id": "pos-1", "device_id": "pt-1", "kind": "purchase",
            "status": "approved", "amount_minor": 1234, "currency": "EUR", "result_code": 0,
            "auth_code": "A1B2C3", "masked_pan": "541333******1234", "card_brand": "mastercard",
            "receipt_no": 1, "trace_no": 1, "terminal_tid": "12345678",
        }  # fmt: skip
        assert await row_state(gw, "p-1") == "approved"
        status = [e["data"] for e in await events(gw, "device.status")]
        assert {"device_id": "pt-1", "kind": "payment", "state": "online"} in status
        health = await gw.health()
        assert {"device_id": "pt-1", "kind": "payment", "state": "online"} in health["devices"]


async def test_declined_customer_abort_and_ecr_abort(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with (
        simulator() as sim,
        gateway(config_factory, store_broker, sim.endpoint) as (gw, _, pos),
    ):
        sim.faults.outcome = "decline"
        declined = await pos.pay(**purchase("p-dec", 501))
        assert (declined["status"], declined["result_code"]) == ("declined", 5)

        sim.faults.outcome = "timeout"  # the customer walks away: 06 1E 6C
        aborted = await pos.pay(**purchase("p-cust", 502))
        assert (aborted["status"], aborted["result_code"]) == ("aborted", 0x6C)

        sim.faults.outcome = "approve"
        sim.faults.card_delay_s, sim.faults.status_every_s = 5.0, 0.5
        await pos.send(purchase("p-ecr", 503))
        await pos.wait(lambda: bool(pos.on("payment/status", "p-ecr")))
        await pos.send({"request_id": "p-ecr"}, action="payment/abort")
        await pos.send({"request_id": "nothing-running"}, action="payment/abort")
        ecr = await pos.result("p-ecr")
        assert ecr["status"] == "aborted"
        await pos.wait(lambda: len(pos.on("payment/abort/result")) == 2)
        answers = {a["request_id"]: a["status"] for a in pos.on("payment/abort/result")}
        assert answers == {"p-ecr": "accepted", "nothing-running": "not_running"}

        assert booked(sim, 501) == booked(sim, 502) == booked(sim, 503) == []
        statuses = {e["data"]["request_id"]: e["data"]["status"] for e in await events(gw)}
        assert statuses == {"p-dec": "declined", "p-cust": "aborted", "p-ecr": "aborted"}


async def test_reversal_by_request_id(store_broker: Broker, config_factory: ConfigFactory) -> None:
    async with (
        simulator() as sim,
        gateway(config_factory, store_broker, sim.endpoint) as (gw, _, pos),
    ):
        sim.faults.outcome = "decline"
        await pos.pay(**purchase("p-declined", 700))
        sim.faults.outcome = "approve"
        await pos.pay(**purchase("p-orig", 1999))
        reversal = await pos.pay(
            request_id="r-1", kind="reversal", reversal_of="p-orig", till="pos-2"
        )
        assert (reversal["status"], reversal["amount_minor"], reversal["currency"]) == (
            "approved", 1999, "EUR",
        )  # fmt: skip
        assert [(e.kind, e.reversal_of) for e in sim.ledger if e.result_code == 0] == [
            ("authorization", None), ("reversal", 1),
        ]  # fmt: skip
        [data] = await completed(gw, "r-1")
        assert (data["kind"], data["reversal_of"], data["terminal_id"]) == (
            "reversal",
            "p-orig",
            "pos-2",
        )

        again = await pos.pay(request_id="r-2", kind="reversal", reversal_of="p-orig")
        unknown = await pos.pay(request_id="r-3", kind="reversal", reversal_of="p-nope")
        of_declined = await pos.pay(request_id="r-4", kind="reversal", reversal_of="p-declined")
        assert again["error"]["code"] == "already-reversed"
        assert unknown["error"]["code"] == of_declined["error"]["code"] == "unknown-original"
        assert all("reversal_of" in r["error"]["message"] for r in (again, unknown, of_declined))
        assert len(sim.ledger) == 3  # nothing more reached the terminal
        assert {e["data"]["request_id"] for e in await events(gw)} == {
            "p-declined",
            "p-orig",
            "r-1",
        }


async def test_busy_terminal_and_repeated_request_id(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with (
        simulator() as sim,
        gateway(config_factory, store_broker, sim.endpoint) as (gw, _, pos),
    ):
        sim.faults.card_delay_s = 1.0
        await pos.send(purchase("p-a", 1111))
        await pos.wait(lambda: bool(pos.on("payment/status", "p-a")))
        other = await pos.pay(**purchase("p-b", 2222), till="pos-2")  # same terminal, other till
        repeated_while_running = await pos.pay(**purchase("p-a", 1111))
        assert other == {
            "request_id": "p-b",
            "status": "busy",
            "amount_minor": 2222,
            "currency": "EUR",
        }
        assert repeated_while_running["status"] == "busy"
        await pos.wait(lambda: len(pos.on("payment/result", "p-a")) == 2)
        first = pos.on("payment/result", "p-a")[1]  # the original request's one answer
        assert first["status"] == "approved"
        repeated = await pos.pay(**purchase("p-a", 1111))
        assert repeated == first  # the stored result, byte for byte the same body
        assert len(booked(sim, 1111)) == 1 and booked(sim, 2222) == []
        assert await row_state(gw, "p-b") is None  # busy: no row, no event
        assert [e["data"]["request_id"] for e in await events(gw)] == ["p-a"]
        sim.faults.card_delay_s = 0.0
        retried = await pos.pay(**purchase("p-b", 2222), till="pos-2")  # busy had no effect
        assert retried["status"] == "approved" and len(booked(sim, 2222)) == 1


@pytest.mark.parametrize(
    "case",
    [
        ({"request_id": "x-1", "amount_minor": 5, "currency": "EUR"}, "pos-1", "invalid", "kind"),
        (purchase("x-2", 0), "pos-1", "invalid", "amount_minor"),
        (purchase("x-3", "398"), "pos-1", "invalid", "amount_minor"),
        (purchase("x-4", True), "pos-1", "invalid", "amount_minor"),
        (
            {"request_id": "x-5", "kind": "purchase", "amount_minor": 5},
            "pos-1",
            "invalid",
            "currency",
        ),
        (purchase("x-6", 5, currency="XXX"), "pos-1", "invalid", "currency"),
        (purchase("x-7", 5, currency="eur"), "pos-1", "invalid", "currency"),
        ({"request_id": "x-8", "kind": "reversal"}, "pos-1", "invalid", "reversal_of"),
        ({"request_id": "x-9", "kind": "refund", "amount_minor": 5}, "pos-1", "invalid", "kind"),
        (purchase("x-10", 5), "pos-9", "no-payment-terminal", "pos-9"),
    ],
)
async def test_rejected_requests_name_the_field_and_leave_no_trace(
    store_broker: Broker,
    config_factory: ConfigFactory,
    case: tuple[dict[str, Any], str, str, str],
) -> None:
    body, till, code, field = case
    async with (
        simulator() as sim,
        gateway(config_factory, store_broker, sim.endpoint) as (gw, _, pos),
    ):
        result = await pos.pay(**body, till=till)
        assert result["status"] == "rejected" and result["request_id"] == body["request_id"]
        assert result["error"]["code"] == code and field in result["error"]["message"]
        await pos.send(b'{"kind": "purchase"}')  # no id to answer to: store/v1/errors
        await pos.wait(lambda: bool(pos.topics("store/v1/errors")))
        assert await events(gw) == [] and await row_state(gw, body["request_id"]) is None
        assert [a for a in sim.received if a.cls == 0x06 and a.instr == 0x01] == []


async def test_terminal_offline_is_rejected_and_retry_works_later(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    dead = f"socket://127.0.0.1:{free_port()}"
    async with gateway(config_factory, store_broker, dead, online=False) as (gw, svc, pos):
        result = await pos.pay(**purchase("p-off", 300))
        assert result["status"] == "rejected" and result["error"]["code"] == "terminal-offline"
        assert await row_state(gw, "p-off") is None and await events(gw) == []
        assert (await gw.health())["devices"] == [
            {"device_id": "pt-1", "kind": "payment", "state": "offline"}
        ]
        assert svc.terminals["pt-1"].driver.state is DeviceState.OFFLINE


async def test_link_lost_while_waiting_for_card_is_failed_once_idle(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with (
        simulator() as sim,
        gateway(config_factory, store_broker, sim.endpoint) as (gw, _, pos),
    ):
        sim.faults.disconnect_at = "card"
        result = await pos.pay(**purchase("p-lost", 400))
        assert result["status"] == "failed" and result["error"]["code"] == "not-booked"
        assert booked(sim, 400) == [] and sim.connections == 2  # reconnected, registered: idle
        [data] = await completed(gw, "p-lost")
        assert data["status"] == "failed"
        states = [e["data"]["state"] for e in await events(gw, "device.status")]
        assert states == ["online", "offline", "online"]


async def test_link_lost_after_booking_keeps_the_booking(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with (
        simulator() as sim,
        gateway(config_factory, store_broker, sim.endpoint) as (gw, _, pos),
    ):
        sim.faults.disconnect_at = "completion"  # 04 0F acknowledged, Completion never comes
        result = await pos.pay(**purchase("p-booked", 401))
        assert result["status"] == "approved" and len(booked(sim, 401)) == 1
        assert [d["status"] for d in await completed(gw, "p-booked")] == ["approved"]


async def test_link_lost_before_acknowledgement_asks_repeat_receipt(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with (
        simulator() as sim,
        gateway(config_factory, store_broker, sim.endpoint) as (gw, _, pos),
    ):
        await pos.pay(**purchase("p-before", 100))  # gives the terminal a last transaction
        sim.faults.disconnect_at = "status_info"  # the line dies right after the 04 0F
        result = await pos.pay(**purchase("p-unacked", 402))
        assert result["status"] == "failed" and result["error"]["code"] == "not-booked"
        assert booked(sim, 402) == [] and [e.amount_minor for e in sim.reversed] == [402]
        assert [a for a in sim.received if (a.cls, a.instr) == (0x06, 0x20)]  # repeat receipt
        assert [d["status"] for d in await completed(gw, "p-unacked")] == ["failed"]


async def test_in_doubt_resolved_by_the_terminal_later(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with (
        simulator() as sim,
        gateway(config_factory, store_broker, sim.endpoint) as (gw, _svc, pos),
    ):
        await pos.pay(**purchase("p-before", 100))
        sim.faults.disconnect_at = "status_info"
        task = asyncio.create_task(pos.pay(**purchase("p-doubt", 403), timeout_s=15))
        await sim.wait_for(lambda: bool(sim.reversed))
        sim.faults.silent = True  # the terminal does not come back within T4
        result = await task
        assert result["status"] == "in_doubt" and result["error"]["code"] == "terminal-unreachable"
        assert await row_state(gw, "p-doubt") == "in_doubt"
        repeated = await pos.pay(**purchase("p-doubt", 403))
        assert repeated == result
        sim.faults.silent = False  # back: asked again, the repeat receipt shows an older one
        await eventually(lambda: has_events(gw, "payment.resolved"), 15.0)
        resolved = [e["data"] for e in await events(gw, "payment.resolved")]
        assert resolved == [
            {"request_id": "p-doubt", "status": "failed", "resolved_by": "terminal"}
        ]
        assert await row_state(gw, "p-doubt") == "failed"
        assert (await pos.pay(**purchase("p-doubt", 403)))["status"] == "failed"
        assert booked(sim, 403) == []


async def test_technician_resolves_in_doubt(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with (
        simulator() as sim,
        gateway(config_factory, store_broker, sim.endpoint) as (gw, _svc, pos),
    ):
        sim.faults.disconnect_at = "status_info"
        task = asyncio.create_task(pos.pay(**purchase("p-tech", 404), timeout_s=15))
        await sim.wait_for(lambda: bool(sim.reversed))
        sim.faults.silent = True
        assert (await task)["status"] == "in_doubt"
        status = await gw.actions["payment.status"]({}, 1000)
        assert status["in_doubt"] == ["p-tech"] and status["terminals"][0]["state"] != "online"
        bad = await gw.actions["payment.resolve"]({"request_id": "p-tech", "status": "maybe"}, 1000)
        assert bad["ok"] is False and bad["error"]["code"] == "invalid"
        done = await gw.actions["payment.resolve"](
            {"request_id": "p-tech", "status": "failed"}, 1000
        )
        assert done["ok"] is True and done["status"] == "failed"
        again = await gw.actions["payment.resolve"](
            {"request_id": "p-tech", "status": "approved"}, 1000
        )
        assert again["error"]["code"] == "not-in-doubt"
        resolved = [e["data"] for e in await events(gw, "payment.resolved")]
        assert resolved == [{"request_id": "p-tech", "status": "failed", "resolved_by": "uid:1000"}]
        assert (await pos.pay(**purchase("p-tech", 404)))["status"] == "failed"
        sim.faults.silent = False


async def test_unsolicited_status_info_is_not_acknowledged(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with (
        simulator() as sim,
        gateway(config_factory, store_broker, sim.endpoint) as (gw, _, pos),
    ):
        assert await sim.push_status_info(amount_minor=999) is False
        assert sim.ledger == [] and [e.amount_minor for e in sim.reversed] == [999]
        assert await events(gw) == []
        assert (await pos.pay(**purchase("p-after", 100)))["status"] == "approved"


async def test_end_of_day_command_runs_in_the_background(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with (
        simulator() as sim,
        gateway(config_factory, store_broker, sim.endpoint) as (gw, _svc, pos),
    ):
        await pos.pay(**purchase("p-1", 1000))
        await pos.pay(**purchase("p-2", 250))
        await pos.pay(request_id="r-1", kind="reversal", reversal_of="p-2")

        def command(cid: str, data: dict[str, Any]) -> bytes:
            return json.dumps({"id": cid, "name": "payment.end_of_day",
                               "issued_at": "2026-01-01T00:00:00Z", "data": data}).encode()  # fmt: skip

        await gw.dispatcher.handle("payment.end_of_day", command("c-1", {}))
        await gw.dispatcher.handle("payment.end_of_day", command("c-2", {"device_id": "pt-9"}))
        await eventually(lambda: has_events(gw, "payment.end_of_day"))
        [eod] = [e["data"] for e in await events(gw, "payment.end_of_day")]
        assert (eod["device_id"], eod["result_code"], eod["total_minor"], eod["currency"]) == (
            "pt-1", 0, 1000, "EUR",
        )  # fmt: skip
        results = {e["data"]["command_id"]: e["data"] for e in await events(gw, "command.result")}
        assert results["c-1"]["status"] == "ok" and results["c-1"]["data"] == {
            "device_ids": ["pt-1"]
        }
        assert results["c-2"]["status"] == "rejected" and "device_id" in results["c-2"]["detail"]


async def test_stop_lets_a_payment_in_progress_finish(
    store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with simulator() as sim, PosClient(store_broker.port) as watcher:
        async with gateway(config_factory, store_broker, sim.endpoint) as (_gw, _, pos):
            sim.faults.card_delay_s = 1.0
            await pos.send(purchase("p-stop", 555))
            await pos.wait(lambda: bool(pos.on("payment/status", "p-stop")))
        # the gateway stopped only after the payment ended and its result went out
        result = await watcher.result("p-stop", timeout_s=1)
        assert result["status"] == "approved" and len(booked(sim, 555)) == 1
