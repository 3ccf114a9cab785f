"""Inventory sync: snapshots interleaved with sales, adjustments, and every snapshot rule."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from gateway.backend_sim import RecordingBackend
from gateway.clock import ClockStatus
from gateway.commands import CommandDispatcher
from gateway.config import GatewayConfig, SecuritySection
from gateway.db import Database
from gateway.inventory import Inventory
from gateway.inventory_sync import InventorySync
from tests.conftest import Broker
from tests.gwharness import running_gateway, wait_connected
from tests.tillclient import Till, sale, wait_store_bus

ConfigFactory = Callable[..., GatewayConfig]


@pytest.fixture
def store_broker(broker_factory: Callable[..., Broker]) -> Broker:
    """The store broker as config/mosquitto/store-broker.conf runs it (no Nagle delays)."""
    return broker_factory(extra_conf="set_tcp_nodelay true")


def snapshot(
    snapshot_id: str, as_of_seq: int, part: int, parts: int, items: dict[str, int]
) -> dict[str, Any]:
    """``inventory.snapshot`` data."""
    return {
        "snapshot_id": snapshot_id,
        "as_of_seq": as_of_seq,
        "part": part,
        "parts": parts,
        "items": [{"sku": s, "on_hand": q} for s, q in items.items()],
    }


async def command(be: RecordingBackend, name: str, data: dict[str, Any], **kw: Any) -> Any:
    """Send a command and return its (first) command.result data."""
    return await be.wait_for_result(await be.send_command(name, data, **kw))


async def sell(till: Till, sale_id: str, sku: str = "a", qty: int = 1) -> int:
    """Sell and return the sale.completed seq."""
    reply = await till.request("sale", sale(sale_id, [(sku, qty, 100)]))
    assert reply["status"] == "accepted", reply
    return int(reply["seq"])


@pytest.mark.broker
async def test_multi_part_snapshot_interleaved_with_sales(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = config_factory(cloud_broker.url, store_broker.url)
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
        Till(store_broker.port, "pos-1") as till,
    ):
        await wait_connected(gw)
        await wait_store_bus(gw)
        for i in range(3):  # seqs 1..6: sale.completed, inventory.changed
            await sell(till, f"s{i}")
        await sell(till, "c0", sku="c")  # seqs 7, 8: folded below; c is absent from the snapshot
        await be.wait_for_seq(8)
        # the cloud folded through seq 8 (all four sales): a = 100 - 3, c = 10 - 1
        part1 = await command(be, "inventory.snapshot", snapshot("snap-1", 8, 1, 2, {"a": 97}))
        assert part1["status"] == "ok" and part1["data"]["applied"] is False
        await sell(till, "s3")  # seq 10: after as_of, stays on top
        assert gw.inventory.item("a").on_hand == -4  # parts are not applied one by one
        # the last part arrives while tills keep selling
        sends = [await till.send("sale", sale(f"r{i}", [("a", 1, 100)])) for i in range(20)]
        last = await command(be, "inventory.snapshot", snapshot("snap-2", 8, 1, 1, {"b": 7}))
        part2 = await command(be, "inventory.snapshot", snapshot("snap-1", 8, 2, 2, {"b": 7}))
        async with asyncio.timeout(10):
            assert {r["status"] for r in await asyncio.gather(*sends)} == {"accepted"}
        assert last["status"] == "ok" and last["data"]["applied"] is True
        assert part2["status"] == "ok" and part2["data"]["applied"] is True
        assert gw.inventory.snapshot_as_of_seq == 8
        expected = {"a": 97 - 21, "b": 7, "c": 0}
        assert {s: gw.inventory.item(s).on_hand for s in expected} == expected
        # the committed state says the same (a restart would rebuild exactly this)
        fresh = Inventory(gw.db)
        await fresh.load()
        assert {s: fresh.item(s).on_hand for s in expected} == expected
        assert await gw.db.fetchone("SELECT count(*) FROM movements WHERE seq <= 8") == (0,)
        assert await gw.db.fetchone("SELECT count(*) FROM snapshot_parts") == (0,)
        reply = await till.request("stock", {"request_id": "q", "skus": ["a", "b", "c"]})
        assert reply["stale"] is False and reply["as_of"] == gw.inventory.as_of
        assert [i["on_hand"] for i in reply["items"]] == [76, 7, 0]


@pytest.mark.broker
async def test_snapshot_rules_and_idempotency(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = config_factory(cloud_broker.url, store_broker.url)
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
        Till(store_broker.port, "pos-1") as till,
    ):
        await wait_connected(gw)
        await wait_store_bus(gw)
        await sell(till, "s0")
        await sell(till, "s1")  # last_seq 4
        snap = "inventory.snapshot"

        async def rejected(data: dict[str, Any]) -> tuple[str, str]:
            result = await command(be, snap, data)
            assert result["status"] == "rejected", result
            return result["reason"], result["detail"]

        reason, detail = await rejected(snapshot("x", 5, 1, 1, {}))
        assert reason == "seq-ahead" and detail.startswith("data.as_of_seq:")
        assert (await rejected(snapshot("x", 1, 2, 1, {})))[0] == "invalid"
        dup_item = {**snapshot("x", 1, 1, 1, {}), "items": [{"sku": "a", "on_hand": 1}] * 2}
        assert (await rejected(dup_item))[1].startswith("data.items:")
        bad_type = {**snapshot("x", 1, 1, 1, {}), "as_of_seq": "1"}
        assert (await rejected(bad_type))[1].startswith("data.as_of_seq:")
        # parts must agree
        assert (await command(be, snap, snapshot("y", 2, 1, 2, {"a": 5})))["status"] == "ok"
        reason, detail = await rejected(snapshot("y", 2, 2, 3, {"b": 5}))
        assert reason == "invalid" and detail.startswith("data.parts")
        # a part repeated under a new command id counts once
        again = await command(be, snap, snapshot("y", 2, 1, 2, {"a": 5}))
        assert again["status"] == "ok" and again["data"]["received"] == 1
        assert await gw.db.fetchone("SELECT count(*) FROM snapshot_parts") == (1,)
        done = await command(be, snap, snapshot("y", 2, 2, 2, {"b": 5}))
        assert done["data"]["applied"] is True
        assert gw.inventory.item("a").on_hand == 5 - 1  # sale s1 (seq 4) is after as_of 2
        # the whole snapshot again, new command ids: no second effect
        await sell(till, "s2")
        replay = await command(be, snap, snapshot("y", 2, 1, 2, {"a": 5}))
        assert replay["data"]["already_applied"] is True
        assert gw.inventory.item("a").on_hand == 3
        # the same command id again: the first outcome, flagged duplicate
        top = gw.db.last_seq  # command results are events too
        cid = await be.send_command(snap, snapshot("z", top, 1, 1, {"a": 50}))
        first = await be.wait_for_result(cid)
        assert first["status"] == "ok" and first["data"]["applied"] is True
        env = be.command_envelope(snap, snapshot("z", top, 1, 1, {"a": 99}), command_id=cid)
        await be.send_raw(snap, json.dumps(env).encode())
        await be.wait_until(lambda r: len(r.results()[cid]) == 2)
        assert be.record.results()[cid][1]["duplicate"] is True
        assert gw.inventory.item("a").on_hand == 50
        # older than the applied snapshot: a late delivery, refused
        assert (await rejected(snapshot("old", top - 1, 1, 1, {"a": 1})))[0] == "stale-snapshot"
        # a sku in two parts: refused and the parts dropped
        await command(be, snap, snapshot("w", top, 1, 2, {"a": 1}))
        reason, detail = await rejected(snapshot("w", top, 2, 2, {"a": 2}))
        assert reason == "invalid" and "more than one part" in detail
        assert await gw.db.fetchone("SELECT count(*) FROM snapshot_parts") == (0,)
        assert gw.inventory.item("a").on_hand == 50
        # equal as_of_seq is fine (an idle store's nightly snapshot)
        same = await command(be, snap, snapshot("v", top, 1, 1, {"a": 40}))
        assert same["data"]["applied"] is True and gw.inventory.item("a").on_hand == 40


@pytest.mark.broker
async def test_adjustment_is_a_movement_once_per_adjustment_id(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = config_factory(cloud_broker.url, store_broker.url)
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
    ):
        await wait_connected(gw)
        data = {"adjustment_id": "adj-1", "sku": "a", "delta": 12, "reason": "delivery"}
        cid = await be.send_command("inventory.adjust", data)
        first = await be.wait_for_result(cid)
        assert first["status"] == "ok" and first["data"]["already_applied"] is False
        seq = first["data"]["seq"]
        await be.wait_for_seq(seq)
        change = be.record.events[seq]
        assert change["type"] == "inventory.changed"
        assert change["data"] == {
            "sku": "a",
            "delta": 12,
            "on_hand": 12,
            "reserved": 0,
            "cause": "adjustment",
            "ref": "adj-1",
        }
        repeat = await command(be, "inventory.adjust", data)  # new command id, same adjustment
        assert repeat["status"] == "ok" and repeat["data"] == {
            **first["data"],
            "already_applied": True,
        }
        await be.send_raw("inventory.adjust", json.dumps(be.command_envelope(
            "inventory.adjust", data, command_id=cid)).encode())  # fmt: skip
        await be.wait_until(lambda r: len(r.results()[cid]) == 2)
        assert be.record.results()[cid][1]["duplicate"] is True
        assert gw.inventory.item("a").on_hand == 12
        assert len(be.record.of_type("inventory.changed")) == 1
        bad = await command(
            be, "inventory.adjust", {**data, "adjustment_id": "adj-2", "delta": 1.5}
        )
        assert bad["status"] == "rejected" and bad["detail"].startswith("data.delta:")
        minus = await command(be, "inventory.adjust", {**data, "adjustment_id": "w", "delta": -20})
        assert minus["status"] == "ok" and gw.inventory.item("a").on_hand == -8


async def test_incomplete_snapshot_expires(db: Database) -> None:
    """Driven through the dispatcher with a fake clock: no broker, no sleeping."""
    now = [1000.0]
    inventory = Inventory(db)
    await inventory.load()
    dispatcher = CommandDispatcher(db, SecuritySection(), ClockStatus("yes"))
    sync = InventorySync(db, inventory, snapshot_expiry_s=60, clock=lambda: now[0])
    for name, spec in sync.specs().items():
        dispatcher.register(name, spec)

    async def send(n: int, data: dict[str, Any]) -> dict[str, Any]:
        env = {"id": f"c{n}", "name": "inventory.snapshot", "issued_at": "2026-11-22T18:00:00Z"}
        await dispatcher.handle("inventory.snapshot", json.dumps({**env, "data": data}).encode())
        row = await db.fetchone("SELECT body FROM events ORDER BY seq DESC LIMIT 1")
        assert row is not None
        result: dict[str, Any] = json.loads(row[0])["data"]
        assert result["command_id"] == f"c{n}"
        return result

    assert (await send(1, snapshot("s", 0, 1, 2, {"a": 1})))["data"]["received"] == 1
    assert (await send(2, snapshot("other", 0, 1, 3, {"x": 1})))["data"]["received"] == 1
    now[0] += 59
    assert (await send(3, snapshot("other", 0, 2, 3, {"y": 1})))["data"]["received"] == 2
    now[0] += 2  # "s" is now 61 s old, "other" too (its first part counts)
    late = await send(4, snapshot("s", 0, 2, 2, {"b": 2}))
    assert late["status"] == "ok" and late["data"] == {
        "snapshot_id": "s",
        "part": 2,
        "parts": 2,
        "received": 1,
        "applied": False,
    }
    rows = await db.fetchall("SELECT snapshot_id, part FROM snapshot_parts ORDER BY 1, 2")
    assert rows == [("s", 2)]
    assert inventory.snapshot_at == 0  # nothing applied
    done = await send(5, snapshot("s", 0, 1, 2, {"a": 1}))
    assert done["data"]["applied"] is True
    assert (inventory.item("a").on_hand, inventory.item("b").on_hand) == (1, 2)
