"""POS bridge end to end: tills on the store broker, the gateway, the cloud broker and backend."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from gateway.backend_sim import RecordingBackend
from gateway.config import GatewayConfig
from tests.conftest import Broker
from tests.gwharness import running_gateway, wait_connected
from tests.tillclient import Till, return_, sale, wait_store_bus

pytestmark = pytest.mark.broker

ConfigFactory = Callable[..., GatewayConfig]


@pytest.fixture
def store_broker(broker_factory: Callable[..., Broker]) -> Broker:
    """The store broker as config/mosquitto/store-broker.conf runs it (no Nagle delays)."""
    return broker_factory(extra_conf="set_tcp_nodelay true")


async def _events(gw: Any, type_: str) -> list[dict[str, Any]]:
    rows = await gw.db.fetchall("SELECT body FROM events WHERE type = ? ORDER BY seq", (type_,))
    return [json.loads(r[0]) for r in rows]


async def test_sale_accepted_after_commit_with_events_and_stock(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = config_factory(cloud_broker.url, store_broker.url)
    async with running_gateway(cfg) as gw, Till(store_broker.port, "pos-3") as till:
        await wait_store_bus(gw)
        body = sale("pos-3-000451", [("4006381333931", 2, 199), ("sku-b", 1, 50)])
        body["payments"] = [
            {"method": "cash", "amount_minor": 48},
            {"method": "card", "amount_minor": 400, "payment_ref": "pay-1"},
        ]
        body["completed_at"] = "2026-11-22T19:00:00.5+01:00"
        body["unknown_field"] = {"ignored": True}
        reply = await till.request("sale", body)
        assert reply == {"sale_id": "pos-3-000451", "status": "accepted", "seq": 1}
        row = await gw.db.fetchone("SELECT kind, terminal_id, seq FROM sales")
        assert row == ("sale", "pos-3", 1)  # committed before the reply
        (ev,) = await _events(gw, "sale.completed")
        assert ev["seq"] == 1
        assert ev["data"] == {
            "sale_id": "pos-3-000451",
            "terminal_id": "pos-3",
            "lines": [
                {"sku": "4006381333931", "qty": 2, "unit_price_minor": 199},
                {"sku": "sku-b", "qty": 1, "unit_price_minor": 50},
            ],
            "total_minor": 448,
            "currency": "EUR",
            "payments": [
                {"method": "cash", "amount_minor": 48},
                {"method": "card", "amount_minor": 400, "payment_ref": "pay-1"},
            ],
            "completed_at": "2026-11-22T18:00:00.500Z",
        }
        changes = [e["data"] for e in await _events(gw, "inventory.changed")]
        assert [(c["sku"], c["delta"], c["on_hand"], c["cause"], c["ref"]) for c in changes] == [
            ("4006381333931", -2, -2, "sale", "pos-3-000451"),
            ("sku-b", -1, -1, "sale", "pos-3-000451"),
        ]
        # negative stock is allowed and reported; no snapshot yet, so stale
        stock = await till.request("stock", {"request_id": "s1", "skus": ["4006381333931", "x"]})
        assert stock == {
            "request_id": "s1",
            "items": [
                {"sku": "4006381333931", "on_hand": -2, "reserved": 0, "available": -2},
                {"sku": "x", "on_hand": 0, "reserved": 0, "available": 0},
            ],
            "as_of": None,
            "stale": True,
        }


async def test_returns_add_stock_and_check_optional_refunds(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = config_factory(cloud_broker.url, store_broker.url)
    async with running_gateway(cfg) as gw, Till(store_broker.port, "pos-1") as till:
        await wait_store_bus(gw)
        assert (await till.request("sale", sale("s-1", [("a", 3, 100)])))["status"] == "accepted"
        plain = await till.request("return", return_("r-1", [("a", 1, 100)]))
        assert plain == {"return_id": "r-1", "status": "accepted", "seq": 3}
        refunded = return_(
            "r-2",
            [("a", 1, 100)],
            original_sale_id="s-1",
            payments=[{"method": "cash", "amount_minor": 100}],
        )
        assert (await till.request("return", refunded))["status"] == "accepted"
        bad = return_("r-3", [("a", 1, 100)], payments=[{"method": "cash", "amount_minor": 99}])
        reply = await till.request("return", bad)
        assert reply["status"] == "rejected"
        assert reply["error"]["code"] == "payment-mismatch"
        assert reply["error"]["message"].startswith("payments:")
        assert gw.inventory.item("a").on_hand == -1
        first, second = (e["data"] for e in await _events(gw, "return.completed"))
        assert "original_sale_id" not in first and "payments" not in first
        assert second["original_sale_id"] == "s-1"
        assert second["payments"] == [{"method": "cash", "amount_minor": 100}]
        changes = [e["data"] for e in await _events(gw, "inventory.changed")]
        assert [(c["delta"], c["cause"], c["ref"]) for c in changes] == [
            (-3, "sale", "s-1"),
            (1, "return", "r-1"),
            (1, "return", "r-2"),
        ]


async def test_tills_keep_selling_while_cloud_broker_is_down(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = config_factory(cloud_broker.url, store_broker.url)
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
    ):
        await wait_connected(gw)
        await wait_store_bus(gw)
        cloud_broker.kill()

        async def till_sells(n: int) -> list[dict[str, Any]]:
            async with Till(store_broker.port, f"pos-{n}") as till:
                futs = [
                    await till.send("sale", sale(f"pos-{n}-{i}", [("a", 1, 10), (f"t{n}", 2, 5)]))
                    for i in range(25)
                ]
                async with asyncio.timeout(10):
                    return list(await asyncio.gather(*futs))

        replies = [r for rs in await asyncio.gather(*(till_sells(n) for n in range(4))) for r in rs]
        assert not gw.cloud.link.connected
        assert {r["status"] for r in replies} == {"accepted"}
        seqs = sorted(r["seq"] for r in replies)
        assert len(set(seqs)) == 100
        assert gw.db.last_seq == 300  # one sale.completed + two inventory.changed per sale
        assert gw.inventory.item("a").on_hand == -100
        cloud_broker.start()
        await be.wait_for_seq(300, timeout_s=20)
        rec = be.record
        assert rec.gaps() == [] and rec.changed_ids == [] and rec.seq_reused == []
        assert sorted(e["seq"] for e in rec.of_type("sale.completed")) == seqs
        changed = rec.of_type("inventory.changed")
        assert len(changed) == 200
        assert changed[-1]["data"]["on_hand"] in range(-100, 0)
        assert min(e["data"]["on_hand"] for e in changed if e["data"]["sku"] == "a") == -100


async def test_repeated_sale_id_is_duplicate_sequential_concurrent_and_across_terminals(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = config_factory(cloud_broker.url, store_broker.url)
    async with (
        running_gateway(cfg) as gw,
        Till(store_broker.port, "pos-1") as till,
        Till(store_broker.port, "pos-2") as other,
    ):
        await wait_store_bus(gw)
        body = sale("dup-1", [("a", 1, 100)])
        first = await till.request("sale", body)
        again = await till.request("sale", body)
        assert first == {"sale_id": "dup-1", "status": "accepted", "seq": 1}
        assert again == {"sale_id": "dup-1", "status": "duplicate", "seq": 1}
        assert await other.request("sale", body) == again  # ids are idempotency keys
        # the same new id many times at once: one commit, the others wait for it
        twin = sale("dup-2", [("a", 1, 100)])
        futs = [await till.send("sale", twin) for _ in range(6)]
        async with asyncio.timeout(10):
            replies = await asyncio.gather(*futs)
        assert sorted(r["status"] for r in replies) == ["accepted"] + ["duplicate"] * 5
        assert {r["seq"] for r in replies} == {3}
        # a return may not take a sale's id (nor the reverse)
        clash = await till.request("return", return_("dup-1", [("a", 1, 100)]))
        assert clash["status"] == "rejected" and clash["error"]["code"] == "id-conflict"
        assert (await till.request("return", return_("ret-1", [("a", 1, 100)])))["seq"] == 5
        clash = await till.request("sale", sale("ret-1", [("a", 1, 100)]))
        assert clash["status"] == "rejected" and clash["error"]["code"] == "id-conflict"
        assert len(await _events(gw, "sale.completed")) == 2
        assert gw.inventory.item("a").on_hand == -1
        assert await gw.db.fetchone("SELECT count(*) FROM movements") == (3,)


def _invalid_cases() -> list[tuple[str, dict[str, Any], str, str]]:
    """(what, body, error code, start of the message naming the field)."""
    ok = sale("x", [("a", 2, 100)])
    line = ok["lines"][0]

    def with_(**kw: Any) -> dict[str, Any]:
        return {**ok, **kw}

    def with_line(**kw: Any) -> dict[str, Any]:
        return with_(lines=[{**line, **kw}])

    def paid(*amounts: int) -> list[dict[str, Any]]:
        return [{"method": "cash", "amount_minor": a} for a in amounts]

    no_total = {k: v for k, v in ok.items() if k != "total_minor"}
    return [
        ("total missing", no_total, "invalid", "total_minor:"),
        ("qty zero", with_line(qty=0), "invalid", "lines.0.qty:"),
        ("qty negative", with_line(qty=-1), "invalid", "lines.0.qty:"),
        ("qty float", with_line(qty=2.0), "invalid", "lines.0.qty:"),
        ("qty bool", with_line(qty=True), "invalid", "lines.0.qty:"),
        ("qty text", with_line(qty="2"), "invalid", "lines.0.qty:"),
        ("qty huge", with_line(qty=10**30), "invalid", "lines.0.qty:"),
        ("price float", with_line(unit_price_minor=1.99), "invalid", "lines.0.unit_price_minor:"),
        ("price negative", with_line(unit_price_minor=-1), "invalid", "lines.0.unit_price_minor:"),
        ("sku empty", with_line(sku=""), "invalid", "lines.0.sku:"),
        ("sku long", with_line(sku="s" * 65), "invalid", "lines.0.sku:"),
        ("sku number", with_line(sku=4006381333931), "invalid", "lines.0.sku:"),
        ("no lines", with_(lines=[]), "invalid", "lines:"),
        ("lines not list", with_(lines={"sku": "a"}), "invalid", "lines:"),
        ("total float", with_(total_minor=200.0), "invalid", "total_minor:"),
        ("currency lower", with_(currency="eur"), "invalid", "currency:"),
        ("currency unknown", with_(currency="USD"), "unknown-currency", "currency:"),
        ("method", with_(payments=[{"method": "iou", "amount_minor": 200}]), "invalid", "payments.0.method:"),
        ("amount zero", with_(payments=paid(0, 200)), "invalid", "payments.0.amount_minor:"),
        ("payments missing", {k: v for k, v in ok.items() if k != "payments"}, "invalid", "payments:"),
        ("completed_at bad", with_(completed_at="yesterday"), "invalid", "completed_at:"),
        ("completed_at no zone", with_(completed_at="2026-11-22T18:00:00"), "invalid", "completed_at:"),
        ("total mismatch", with_(total_minor=199, payments=paid(199)), "total-mismatch", "total_minor:"),
        ("payments short", with_(payments=paid(150)), "payment-mismatch", "payments:"),
        ("payments over", with_(payments=paid(150, 100)), "payment-mismatch", "payments:"),
        ("too many lines", with_(lines=[line] * 4, total_minor=800, payments=paid(800)), "too-many-lines", "lines:"),
    ]  # fmt: skip


async def test_every_rejection_path_names_the_field(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = config_factory(cloud_broker.url, store_broker.url, pos={"max_lines": 3})
    async with running_gateway(cfg) as gw, Till(store_broker.port, "pos-7") as till:
        await wait_store_bus(gw)
        cases = _invalid_cases()
        futs = []
        for i, (_, body, _, _) in enumerate(cases):
            futs.append(await till.send("sale", {**body, "sale_id": f"bad-{i}"}))
        async with asyncio.timeout(10):
            replies = await asyncio.gather(*futs)
        wrong = [
            (what, reply)
            for (what, _, code, where), reply in zip(cases, replies, strict=True)
            if reply["status"] != "rejected"
            or reply["error"]["code"] != code
            or not reply["error"]["message"].startswith(where)
        ]
        assert wrong == []
        assert gw.db.last_seq == 0  # nothing rejected left a trace
        # stock requests are checked too
        reply = await till.request("stock", {"request_id": "q", "skus": ["a"] * 501})
        assert reply["status"] == "rejected" and reply["error"]["message"].startswith("skus:")
        # the id cannot be read: the error goes to store/v1/errors
        for payload, code in (
            (b"{not json", "invalid-json"),
            (b"\xff\xfe", "invalid-json"),
            (b"[1, 2]", "invalid-json"),
            (json.dumps({"lines": []}).encode(), "invalid-id"),
            (json.dumps({"sale_id": 7}).encode(), "invalid-id"),
            (json.dumps({"sale_id": "x" * 65}).encode(), "invalid-id"),
        ):
            await till.publish_raw("sale", payload)
            error = await till.next_error()
            assert error["topic"] == "store/v1/pos/pos-7/sale"
            assert error["error"]["code"] == code
        # and the gateway still serves
        assert (await till.request("sale", sale("fine", [("a", 1, 1)])))["status"] == "accepted"


async def test_stock_lookup_of_500_skus_is_fast_and_reports_snapshot_time(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = config_factory(cloud_broker.url, store_broker.url, inventory={"stale_after_s": 1})
    async with running_gateway(cfg) as gw, Till(store_broker.port, "pos-1") as till:
        await wait_store_bus(gw)
        skus = [f"sku-{i:04d}" for i in range(500)]
        await gw.inventory.apply_snapshot(0, {s: i for i, s in enumerate(skus)})
        body = {"request_id": "big", "skus": skus}
        reply = await till.request("stock", body)  # warm-up
        assert reply["stale"] is False and reply["as_of"] == gw.inventory.as_of
        assert [i["on_hand"] for i in reply["items"]] == list(range(500))
        started = time.perf_counter()
        for n in range(10):
            reply = await till.request("stock", {**body, "request_id": f"big-{n}"})
        round_trip_ms = (time.perf_counter() - started) * 100  # mean of 10, in ms
        assert len(reply["items"]) == 500
        assert round_trip_ms < 50, f"500-SKU lookup took {round_trip_ms:.1f} ms round trip"
        gw.inventory.snapshot_at -= 2  # the snapshot is now older than stale_after_s
        assert (await till.request("stock", {"request_id": "late", "skus": ["x"]}))["stale"]
