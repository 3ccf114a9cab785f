"""Click and collect end to end: real brokers, the gateway, simulated Modbus locker boards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import tomlkit
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devices.sim.locker_sim import LockerBoardSim
from gateway.app import Gateway
from gateway.backend_sim import RecordingBackend
from gateway.clock import ClockStatus, format_rfc3339, uuid7
from gateway.config import GatewayConfig
from gateway.ctl import main as ctl_main
from gateway.db import Database, Work
from gateway.inventory import Inventory
from gateway.lockers import LockerService, locker_service
from gateway.signing import public_key_b64
from tests.conftest import Broker, make_config_dict
from tests.gwharness import running_gateway

pytestmark = pytest.mark.broker

ConfigFactory = Callable[..., GatewayConfig]
BANK = "A"
# compartment -> (size, unit, channel): two boards on one bus
WIRING = {1: ("S", 1, 0), 2: ("M", 1, 1), 3: ("M", 1, 2), 4: ("L", 2, 0)}
REPO = Path(__file__).resolve().parent.parent


def bank_config(endpoint: str, **overrides: Any) -> dict[str, Any]:
    bank: dict[str, Any] = {
        "id": BANK,
        "endpoint": endpoint,
        "compartments": [
            {"number": n, "size": s, "unit": u, "channel": ch} for n, (s, u, ch) in WIRING.items()
        ],
        "poll_ms": 20,
        "response_timeout_ms": 40,
        "retries": 1,
        "open_confirm_s": 0.2,
        "jam_tries": 2,
        "door_left_open_s": 0.6,
        "forced_open_window_s": 0.5,
    }
    bank.update(overrides)
    return bank


def sections(endpoint: str, key: Ed25519PrivateKey, **lockers: Any) -> dict[str, Any]:
    rules = {"wrong_code_limit": 3, "wrong_code_window_s": 60, "lockout_s": 2}
    rules.update(lockers)
    return {
        "locker_banks": [bank_config(endpoint)],
        "lockers": rules,
        "security": {"command_keys": [public_key_b64(key)]},
        "cloud": {"resend_after_s": 0.5},
    }


class Kiosk:
    """A locker kiosk / staff handheld on the store broker: requests, replies, retained state."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[tuple[str, Any]] = []
        self._changed = asyncio.Condition()
        self._client: aiomqtt.Client | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Kiosk]:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier=f"kiosk-{uuid7()[-8:]}") as c:
            await c.subscribe("store/v1/lockers/#", qos=1)
            await c.subscribe("store/v1/errors", qos=1)
            self._client = c
            reader = asyncio.get_running_loop().create_task(self._read(c))
            try:
                yield self
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _read(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else b""
            try:
                body = json.loads(payload)
            except json.JSONDecodeError:
                body = payload
            async with self._changed:
                self.messages.append((str(msg.topic), body))
                self._changed.notify_all()

    async def wait(self, pred: Callable[[str, Any], bool], timeout_s: float = 5.0) -> Any:
        """The first message (topic, body) satisfying ``pred``."""

        def found() -> Any:
            return next((b for t, b in self.messages if pred(t, b)), None)

        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        return found()

    async def send(self, action: str, body: Any, *, bank: str = BANK) -> None:
        assert self._client is not None
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        await self._client.publish(f"store/v1/lockers/{bank}/{action}", raw, qos=1)

    async def request(
        self, action: str, timeout_s: float = 5.0, bank: str = BANK, **fields: Any
    ) -> dict[str, Any]:
        """Send a request and return its reply."""
        rid = fields.pop("request_id", None) or f"r-{uuid7()}"
        count = len(self.replies(action, rid, bank))
        await self.send(action, {"request_id": rid, **fields}, bank=bank)
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: len(self.replies(action, rid, bank)) > count)
        return self.replies(action, rid, bank)[-1]

    def replies(self, action: str, rid: str, bank: str = BANK) -> list[dict[str, Any]]:
        topic = f"store/v1/lockers/{bank}/{action}/result"
        return [b for t, b in self.messages if t == topic and b.get("request_id") == rid]

    async def state(self, pred: Callable[[dict[int, str]], bool], timeout_s: float = 5.0) -> None:
        """Wait until the latest retained state of the bank satisfies ``pred``."""

        def latest() -> dict[int, str] | None:
            topic = f"store/v1/lockers/{BANK}/state"
            bodies = [b for t, b in self.messages if t == topic]
            return {c["number"]: c["state"] for c in bodies[-1]["compartments"]} if bodies else None

        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: (s := latest()) is not None and pred(s))


@dataclass
class Rig:
    gw: Gateway
    service: LockerService
    sim: LockerBoardSim
    be: RecordingBackend
    kiosk: Kiosk
    cloud: Broker

    async def create(self, order_id: str, size: str = "M", pickup_in_s: float = 3600.0) -> None:
        data = {
            "order_id": order_id,
            "items": [{"sku": "sku-1", "qty": 2}],
            "size": size,
            "pickup_by": format_rfc3339(time.time() + pickup_in_s),
            "customer_ref": "cust-77",
        }
        cid = await self.be.send_command("order.pickup.create", data)
        result = await self.be.wait_for_result(cid)
        assert result["status"] == "ok", result

    async def load(self, order_id: str) -> tuple[int, str]:
        """Staff loads the order and closes the door; returns (compartment, pickup code)."""
        reply = await self.kiosk.request("load", order_id=order_id)
        assert reply["status"] == "opened", reply
        number = reply["compartment"]
        _size, unit, ch = WIRING[number]
        assert self.sim.door_is_open(unit, ch)
        self.sim.close_door(unit, ch)
        await self.kiosk.state(lambda s: s[number] == "occupied")
        return number, await self.code_of(order_id)

    async def code_of(self, order_id: str) -> str:
        """The pickup code from the committed in_locker event (read from the outbox)."""
        for (body,) in await self.gw.db.fetchall(
            "SELECT body FROM events WHERE type = 'order.updated' ORDER BY seq"
        ):
            data = json.loads(body)["data"]
            if data["order_id"] == order_id and data["status"] == "in_locker":
                return str(data["pickup_code"])
        raise AssertionError(f"no in_locker event for {order_id}")

    def pulses(self, number: int) -> int:
        _size, unit, ch = WIRING[number]
        return self.sim.pulse_count(unit, ch)

    def close(self, number: int) -> None:
        _size, unit, ch = WIRING[number]
        self.sim.close_door(unit, ch)


def events(be: RecordingBackend, type_: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e["data"]
        for e in be.record.of_type(type_)
        if all(e["data"].get(k) == v for k, v in match.items())
    ]


@contextlib.asynccontextmanager
async def rig(
    cloud: Broker,
    store: Broker,
    config_factory: ConfigFactory,
    *,
    transport: str = "tcp",
    **lockers: Any,
) -> AsyncIterator[Rig]:
    key = Ed25519PrivateKey.generate()
    async with LockerBoardSim([1, 2], transport=transport) as sim:  # type: ignore[arg-type]
        cfg = config_factory(cloud.url, store.url, **sections(sim.endpoint, key, **lockers))
        # the backend is entered first so that it leaves last, after the gateway has stopped:
        # RecordingBackend's cancel can be lost when a message races it (Python 3.11 wait_for)
        async with (
            RecordingBackend("127.0.0.1", cloud.port, "store-0042", signing_key=key) as be,
            Kiosk(store.port).running() as kiosk,
            running_gateway(cfg) as gw,
        ):
            await gw.inventory.apply_snapshot(0, {"sku-1": 10, "sku-2": 5})
            r = Rig(gw, locker_service(gw), sim, be, kiosk, cloud)
            await kiosk.state(lambda s: set(s.values()) == {"free"})
            yield r


# --- the lifecycle ------------------------------------------------------------------------------


async def test_lifecycle_with_the_cloud_down_during_loading_and_pickup(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with rig(cloud_broker, store_broker, config_factory, transport="pty") as r:
        await r.create("o-1")
        assert r.gw.inventory.item("sku-1").reserved == 2
        await r.be.wait_until(lambda rec: events(r.be, "order.updated", status="accepted"))
        assert r.gw.health is not None
        assert {"device_id": BANK, "kind": "locker", "state": "online"} in (await r.gw.health())[
            "devices"
        ]

        cloud_broker.kill()  # loading and pickup happen with the cloud unreachable
        reply = await r.kiosk.request("load", order_id="o-1", request_id="load-1")
        assert reply == {"request_id": "load-1", "status": "opened", "compartment": 2}
        await r.kiosk.state(lambda s: s[2] == "open")
        again = await r.kiosk.request("load", order_id="o-1", request_id="load-1")
        assert again == reply and r.pulses(2) == 1  # the same id: same answer, no second pulse
        r.close(2)
        await r.kiosk.state(lambda s: s[2] == "occupied")
        code = await r.code_of("o-1")

        # pickup happens offline too, in the same outage
        wrong = "000000" if code != "000000" else "111111"
        assert (await r.kiosk.request("pickup", code=wrong))["status"] == "invalid_code"
        reply = await r.kiosk.request("pickup", code=code, request_id="pick-1")
        assert reply == {"request_id": "pick-1", "status": "opened", "compartment": 2}
        assert r.pulses(2) == 2
        used = await r.kiosk.request("pickup", code=code)
        assert used["status"] == "invalid_code"  # single use
        assert r.pulses(2) == 2
        r.close(2)
        await r.kiosk.state(lambda s: s[2] == "free")
        stock = r.gw.inventory.item("sku-1")
        assert (stock.on_hand, stock.reserved) == (8, 0)

        cloud_broker.start()
        await r.be.wait_until(lambda rec: events(r.be, "order.updated", status="collected"), 15)
        (loaded,) = events(r.be, "order.updated", status="in_locker")
        assert loaded == {
            "order_id": "o-1",
            "status": "in_locker",
            "bank": BANK,
            "compartment": 2,
            "pickup_code": code,
        }
        await r.be.wait_for_seq(r.gw.db.last_seq, 15)
        assert r.be.record.gaps() == [] and r.be.record.changed_ids == []
        opened = events(r.be, "locker.opened", bank=BANK, compartment=2)
        assert [(o["by"], o["ref"]) for o in opened] == [("load", "o-1"), ("pickup", "o-1")]
        (moved,) = events(r.be, "inventory.changed", cause="pickup")
        assert moved == {
            "sku": "sku-1",
            "delta": -2,
            "on_hand": 8,
            "reserved": 0,
            "cause": "pickup",
            "ref": "o-1",
        }
        # audit before pulse: each locker.opened precedes the state change it led to
        seqs = sorted(r.be.record.events.items())
        first_opened = next(s for s, e in seqs if e["type"] == "locker.opened")
        in_locker = next(s for s, e in seqs if e["data"].get("status") == "in_locker")
        assert first_opened < in_locker
        codes_seen = [e for e in r.be.record.events.values() if "pickup_code" in e["data"]]
        assert len(codes_seen) == 1  # the code leaves the store once
        row = await r.gw.db.fetchone("SELECT code_hash FROM orders WHERE order_id = 'o-1'")
        assert row == (None,)


async def test_wrong_codes_lock_the_keypad_across_a_restart(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    key = Ed25519PrivateKey.generate()
    async with LockerBoardSim([1, 2], transport="tcp") as sim:
        cfg = config_factory(
            cloud_broker.url, store_broker.url, **sections(sim.endpoint, key, lockout_s=3)
        )
        async with (
            RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042", signing_key=key) as be,
            Kiosk(store_broker.port).running() as kiosk,
        ):
            async with running_gateway(cfg) as gw:
                await gw.inventory.apply_snapshot(0, {"sku-1": 10})
                r = Rig(gw, locker_service(gw), sim, be, kiosk, cloud_broker)
                await r.create("o-a")
                await r.create("o-b", size="S")
                number_a, code_a = await r.load("o-a")
                _number_b, code_b = await r.load("o-b")
                wrong = next(c for c in ("123456", "654321", "111222") if c not in (code_a, code_b))
                # two wrong, then a success resets the count
                for _ in range(2):
                    assert (await kiosk.request("pickup", code=wrong))["status"] == "invalid_code"
                assert (await kiosk.request("pickup", code=code_b))["status"] == "opened"
                for _ in range(2):
                    assert (await kiosk.request("pickup", code=wrong))["status"] == "invalid_code"
                assert not events(be, "locker.alert", alert="code_lockout")
                # the 3rd within the window: still invalid_code, and the keypad locks
                assert (await kiosk.request("pickup", code=wrong))["status"] == "invalid_code"
                locked = await kiosk.request("pickup", code=code_a)  # even the right code
                assert locked["status"] == "locked_out" and 1 <= locked["retry_after_s"] <= 3
                await be.wait_until(lambda rec: events(be, "locker.alert", alert="code_lockout"))
                assert events(be, "locker.alert", alert="code_lockout") == [
                    {"bank": BANK, "alert": "code_lockout"}
                ]
            async with running_gateway(cfg) as gw:  # a restart does not lift the lockout
                again = await kiosk.request("pickup", code=code_a)
                assert again["status"] == "locked_out"
                await asyncio.sleep(again["retry_after_s"] + 0.1)
                assert (await kiosk.request("pickup", code=code_a))["status"] == "opened"
            _size, unit, ch = WIRING[number_a]
            assert sim.pulse_count(unit, ch) == 2  # load + the one successful pickup


async def test_stored_answers_older_than_a_week_are_pruned_at_start_up(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    key = Ed25519PrivateKey.generate()
    async with LockerBoardSim([1, 2], transport="tcp") as sim:
        cfg = config_factory(cloud_broker.url, store_broker.url, **sections(sim.endpoint, key))
        async with (
            RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042", signing_key=key) as be,
            Kiosk(store_broker.port).running() as kiosk,
        ):
            async with running_gateway(cfg) as gw:
                await gw.inventory.apply_snapshot(0, {"sku-1": 10})
                for rid in ("old", "new"):
                    reply = await kiosk.request("load", request_id=rid, order_id="o-1")
                    assert reply["status"] == "unknown_order"
                eight_days_s = 8 * 86_400.0
                age = ("UPDATE locker_requests SET at = at - ? WHERE request_id = 'old'",)
                await gw.db.submit(Work(statements=[(*age, (eight_days_s,))], refusable=False))
                requests = locker_service(gw).requests
                gw.clock = ClockStatus("no")  # an untrusted clock forgets nothing
                assert await requests.prune() == 0
                gw.clock = ClockStatus("yes")
                r = Rig(gw, locker_service(gw), sim, be, kiosk, cloud_broker)
                await r.create("o-1")
            async with running_gateway(cfg) as gw:
                # the repeated new id keeps its first answer; the forgotten old one is served anew
                again = await kiosk.request("load", request_id="new", order_id="o-1")
                assert again["status"] == "unknown_order"
                rows = await gw.db.fetchall("SELECT request_id FROM locker_requests")
                assert rows == [("new",)]
                fresh = await kiosk.request("load", request_id="old", order_id="o-1")
                assert fresh["status"] == "opened"
                r = Rig(gw, locker_service(gw), sim, be, kiosk, cloud_broker)
                r.close(fresh["compartment"])
                await kiosk.state(lambda s: s[fresh["compartment"]] == "occupied")


# --- expiry, cancel, retrieve, remote and technician openings -------------------------------


async def test_expiry_cancel_retrieve_remote_and_technician(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with rig(cloud_broker, store_broker, config_factory) as r:
        await r.create("o-exp", pickup_in_s=1.5)
        await r.create("o-can")
        await r.create("o-never", size="L", pickup_in_s=0.5)  # expires before it is loaded
        number, code = await r.load("o-exp")
        can_number, can_code = await r.load("o-can")
        await r.be.wait_until(
            lambda rec: events(r.be, "order.updated", order_id="o-never", status="expired"), 5
        )
        await r.be.wait_until(
            lambda rec: events(r.be, "order.updated", status="expired", order_id="o-exp"), 5
        )
        assert events(r.be, "order.updated", order_id="o-exp", status="expired") == [
            {"order_id": "o-exp", "status": "expired", "bank": BANK, "compartment": number}
        ]
        assert (await r.kiosk.request("pickup", code=code))["status"] == "expired"
        assert r.gw.inventory.item("sku-1").reserved == 2  # only o-can holds stock now

        cid = await r.be.send_command("order.pickup.cancel", {"order_id": "o-can"})
        assert (await r.be.wait_for_result(cid))["status"] == "ok"
        assert r.gw.inventory.item("sku-1").reserved == 0
        assert (await r.kiosk.request("pickup", code=can_code))["status"] == "invalid_code"
        cid = await r.be.send_command("order.pickup.cancel", {"order_id": "o-can"})
        assert (await r.be.wait_for_result(cid))["status"] == "ok"  # idempotent by order
        assert len(events(r.be, "order.updated", order_id="o-can", status="cancelled")) <= 1

        # staff empty both; a free or in-use compartment is not for retrieval
        assert (await r.kiosk.request("retrieve", compartment=1))["status"] == "wrong_state"
        for n in (number, can_number):
            before = r.pulses(n)
            reply = await r.kiosk.request("retrieve", compartment=n)
            assert reply["status"] == "opened" and reply["compartment"] == n
            assert r.pulses(n) == before + 1
            r.close(n)
        await r.kiosk.state(lambda s: s[number] == "free" and s[can_number] == "free")

        # remote opening: signed, audited with the command id, never twice for one id
        cid = await r.be.send_command(
            "locker.open", {"bank": BANK, "compartment": 4, "reason": "support"}
        )
        result = await r.be.wait_for_result(cid)
        assert result["status"] == "ok" and r.pulses(4) == 1
        r.close(4)
        await r.kiosk.state(lambda s: s[4] == "free")
        await r.be.send_command(
            "locker.open", {"bank": BANK, "compartment": 4, "reason": "support"}, command_id=cid
        )
        await r.be.wait_until(lambda rec: len(rec.results()[cid]) == 2)
        assert r.be.record.results()[cid][1]["duplicate"] is True and r.pulses(4) == 1
        unsigned = await r.be.send_command(
            "locker.open", {"bank": BANK, "compartment": 4, "reason": "x"}, sign_it=False
        )
        assert (await r.be.wait_for_result(unsigned))["reason"] == "bad-signature"

        opened = await r.service.technician_open(BANK, 1, 1000)
        assert opened.opened and r.pulses(1) == 1
        await r.be.wait_until(lambda rec: events(r.be, "locker.opened", by="technician"))
        assert events(r.be, "locker.opened", by="remote") == [
            {"bank": BANK, "compartment": 4, "by": "remote", "ref": cid}
        ]
        assert events(r.be, "locker.opened", by="technician") == [
            {"bank": BANK, "compartment": 1, "by": "technician", "ref": "uid:1000"}
        ]
        assert r.pulses(4) == 1 and r.pulses(1) == 1


# --- alerts and device status ---------------------------------------------------------------


async def test_forced_open_jam_door_left_open_and_unplug(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with rig(cloud_broker, store_broker, config_factory) as r:
        be = r.be
        r.sim.force_open(1, 0)
        await be.wait_until(lambda rec: events(be, "locker.alert", alert="forced_open"))
        assert events(be, "locker.alert", alert="forced_open") == [
            {"bank": BANK, "alert": "forced_open", "compartment": 1}
        ]
        await r.kiosk.state(lambda s: s[1] == "open")
        r.close(1)

        # a jammed M compartment: two pulses (jam_tries), alert, out of order; load moves on
        r.sim.jam(1, 1)
        await r.create("o-j")
        reply = await r.kiosk.request("load", order_id="o-j")
        assert reply["status"] == "opened" and reply["compartment"] == 3
        assert r.pulses(2) == 2 and r.pulses(3) == 1
        await be.wait_until(lambda rec: events(be, "locker.alert", alert="jammed"))
        assert events(be, "locker.alert", alert="jammed")[0]["compartment"] == 2
        await r.kiosk.state(lambda s: s[2] == "out_of_order" and s[3] == "open")
        opened_2 = events(be, "locker.opened", compartment=2)
        await be.wait_until(lambda rec: len(events(be, "locker.opened", compartment=2)) == 2)
        assert len(opened_2) <= 2  # one audit per pulse

        # staff leave the door open: door_left_open
        await be.wait_until(lambda rec: events(be, "locker.alert", alert="door_left_open"), 5)
        r.close(3)
        await r.kiosk.state(lambda s: s[3] == "occupied")

        # the whole bus unplugged, then back
        await r.sim.unplug()
        await be.wait_until(
            lambda rec: events(be, "device.status", device_id=BANK, state="offline")
        )
        await be.wait_until(lambda rec: events(be, "locker.alert", alert="board_offline"))
        await r.kiosk.state(lambda s: set(s.values()) == {"out_of_order"})
        code = await r.code_of("o-j")
        assert (await r.kiosk.request("pickup", code=code))["status"] == "device_offline"
        await r.sim.replug()
        await be.wait_until(
            lambda rec: events(be, "device.status", device_id=BANK, state="online"), 10
        )
        await be.wait_until(lambda rec: events(be, "locker.alert", alert="board_online"), 10)
        await r.kiosk.state(lambda s: s[3] == "occupied")
        assert (await r.kiosk.request("pickup", code=code))["status"] == "opened"


# --- bad input ------------------------------------------------------------------------------


async def test_bad_input_on_every_locker_topic_gets_a_clear_answer(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    async with rig(cloud_broker, store_broker, config_factory) as r:
        k = r.kiosk
        for action in ("load", "pickup", "retrieve"):
            await k.send(action, b"{not json")
            await k.send(action, {"code": "1"})
        await k.wait(
            lambda t, b: (
                t == "store/v1/errors"
                and sum(1 for tt, _ in k.messages if tt == "store/v1/errors") >= 6
            )
        )
        errors = [b for t, b in k.messages if t == "store/v1/errors"]
        assert {e["error"]["code"] for e in errors} == {"invalid-json", "invalid-id"}
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("load", {}, "order_id"),
            ("load", {"order_id": 7}, "order_id"),
            ("pickup", {"code": "12ab56"}, "code"),
            ("pickup", {"code": 482913}, "code"),
            ("pickup", {}, "code"),
            ("retrieve", {"compartment": "2"}, "compartment"),
            ("retrieve", {"compartment": 0}, "compartment"),
        ]
        for action, fields, field in cases:
            reply = await k.request(action, **fields)
            assert reply["status"] == "rejected", (action, fields)
            assert reply["error"]["code"] == "invalid" and field in reply["error"]["message"]
        reply = await k.request("retrieve", compartment=99)
        assert reply["error"]["code"] == "unknown-compartment"
        reply = await k.request("pickup", bank="Z", code="123456")
        assert reply["error"]["code"] == "unknown-bank"
        assert (await k.request("load", order_id="nope"))["status"] == "unknown_order"
        assert r.sim.requests_for(1, 5) == [] or all(
            req.raw[2:4] == b"\x00\xff" for req in r.sim.requests_for(1, 5)
        )  # nothing but "all relays off": no pulse from bad input

        be = r.be
        bad_commands: list[tuple[str, dict[str, Any], str]] = [
            (
                "order.pickup.create",
                {"order_id": "x", "items": [], "size": "M", "pickup_by": "2030-01-01T00:00:00Z"},
                "items",
            ),
            (
                "order.pickup.create",
                {
                    "order_id": "x",
                    "items": [{"sku": "sku-1", "qty": 0}],
                    "size": "M",
                    "pickup_by": "2030-01-01T00:00:00Z",
                },
                "qty",
            ),
            (
                "order.pickup.create",
                {
                    "order_id": "x",
                    "items": [{"sku": "sku-1", "qty": 1}],
                    "size": "XL",
                    "pickup_by": "2030-01-01T00:00:00Z",
                },
                "size",
            ),
            (
                "order.pickup.create",
                {
                    "order_id": "x",
                    "items": [{"sku": "sku-1", "qty": 1}],
                    "size": "M",
                    "pickup_by": "tomorrow",
                },
                "pickup_by",
            ),
            ("order.pickup.cancel", {}, "order_id"),
            ("locker.open", {"bank": BANK, "compartment": "1", "reason": "r"}, "compartment"),
        ]
        for name, data, field in bad_commands:
            cid = await be.send_command(name, data)
            res = await be.wait_for_result(cid)
            assert res["reason"] == "invalid" and field in res["detail"], (name, res)
        cid = await be.send_command("order.pickup.cancel", {"order_id": "nope"})
        assert (await be.wait_for_result(cid))["reason"] == "unknown-order"
        cid = await be.send_command("locker.open", {"bank": BANK, "compartment": 99, "reason": "r"})
        assert (await be.wait_for_result(cid))["reason"] == "unknown-compartment"
        data = {
            "order_id": "o-u",
            "items": [{"sku": "nope", "qty": 1}],
            "size": "S",
            "pickup_by": format_rfc3339(time.time() + 60),
        }
        cid = await be.send_command("order.pickup.create", data)
        res = await be.wait_for_result(cid)
        assert res["status"] == "rejected" and res["reason"] == "unknown-sku"
        await be.wait_until(lambda rec: events(be, "order.updated", order_id="o-u"))
        (rejected,) = events(be, "order.updated", order_id="o-u")
        assert rejected["status"] == "rejected" and "nope" in rejected["reason"]
        assert r.gw.inventory.item("nope").reserved == 0


# --- a crash between pulse and state commit -------------------------------------------------


def _start_daemon(config: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
        )


async def test_a_kill_between_pulse_and_state_commit_is_reported_not_repeated(
    tmp_path: Path, cloud_broker: Broker, store_broker: Broker
) -> None:
    key = Ed25519PrivateKey.generate()
    async with LockerBoardSim([1, 2], transport="tcp") as sim:
        raw = make_config_dict(
            tmp_path, cloud_broker.url, store_broker.url, **sections(sim.endpoint, key)
        )
        config = tmp_path / "gateway.toml"
        config.write_text(tomlkit.dumps(raw))
        db_path = Path(raw["storage"]["path"])
        async with Database(db_path, store_id="store-0042", boot_id="setup") as db:
            writer = asyncio.get_running_loop().create_task(db.run())
            await Inventory(db).apply_snapshot(0, {"sku-1": 10})
            db.request_stop()
            await writer
        log = tmp_path / "daemon.log"
        proc = _start_daemon(config, log, STORE_GATEWAY_CRASH_AT="locker-after-pulse")
        try:
            async with (
                RecordingBackend(
                    "127.0.0.1", cloud_broker.port, "store-0042", signing_key=key
                ) as be,
                Kiosk(store_broker.port).running() as kiosk,
            ):
                await kiosk.state(lambda s: set(s.values()) == {"free"}, 15)
                r = Rig(None, None, sim, be, kiosk, cloud_broker)  # type: ignore[arg-type]
                await r.create("o-c")
                await kiosk.send("load", {"request_id": "load-c", "order_id": "o-c"})
                rc = await asyncio.to_thread(proc.wait, 10)
                assert rc == -9  # SIGKILLed itself right after the pulse
                assert r.pulses(2) == 1 and kiosk.replies("load", "load-c") == []

                proc = _start_daemon(config, log)

                def reports() -> list[dict[str, Any]]:
                    return [e for e in events(be, "device.status", state="error") if "detail" in e]

                await be.wait_until(lambda rec: reports(), 15)
                (report,) = reports()
                assert report["device_id"] == BANK and "compartment 2" in report["detail"]
                assert "load" in report["detail"] and "o-c" in report["detail"]
                await kiosk.state(lambda s: s[2] == "open", 10)  # the pulse did open it
                r.close(2)
                await kiosk.state(lambda s: s[2] == "out_of_order", 10)  # staff must check
                # the pulse is not repeated; the order is still accepted and can be loaded again
                assert r.pulses(2) == 1
                reply = await kiosk.request("load", order_id="o-c", timeout_s=10)
                assert reply["status"] == "opened" and reply["compartment"] == 3
                assert r.pulses(2) == 1 and r.pulses(3) == 1
                statuses = [e["status"] for e in events(be, "order.updated", order_id="o-c")]
                assert statuses == ["accepted"]
                await be.wait_until(lambda rec: len(events(be, "locker.opened")) >= 2, 10)
                await be.wait_for_seq(max(be.record.events), 10)
                # one audit for the one pulse, committed before it; none for a repeat
                assert len(events(be, "locker.opened", compartment=2)) == 1
                assert be.record.gaps() == []
                # stop the daemon before the backend: see _stop_first
                proc.terminate()
                assert await asyncio.to_thread(proc.wait, 20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait, 20)


async def test_gatewayctl_locker_open_pulses_through_the_daemon_and_is_recorded(
    cloud_broker: Broker,
    store_broker: Broker,
    config_factory: ConfigFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with rig(cloud_broker, store_broker, config_factory) as r:
        cfg = tmp_path / "ctl.toml"
        cfg.write_text(
            f'[store]\nid = "store-0042"\n[cloud]\nurl = "mqtt://127.0.0.1:1"\n'
            f'[store_bus]\nurl = "mqtt://127.0.0.1:1"\n[control]\nsocket = "{r.gw.config.control.socket}"\n'
            f'[storage]\npath = "{r.gw.config.storage.path}"\n'
        )
        before = r.sim.pulse_count(1, 0)
        code = await asyncio.to_thread(ctl_main, ["--config", str(cfg), "locker", "open", "A", "1"])
        assert code == 0, capsys.readouterr().err
        assert r.sim.pulse_count(1, 0) == before + 1
        await r.be.wait_until(
            lambda rec: any(
                e["data"].get("by") == "technician" for e in rec.of_type("locker.opened")
            )
        )
        opened = events(r.be, "locker.opened", by="technician")
        assert opened[-1]["ref"] == f"uid:{os.getuid()}"
        assert (opened[-1]["bank"], opened[-1]["compartment"]) == ("A", 1)
        code = await asyncio.to_thread(
            ctl_main, ["--config", str(cfg), "locker", "open", "A", "99"]
        )
        assert code == 1
        assert "99" in capsys.readouterr().err
