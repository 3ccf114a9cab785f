"""``store-gateway demo``: one store day on one machine — no hardware, no configuration.

Brokers: the local ``mosquitto`` when it is on the PATH, else an embedded amqtt broker (the
``demo`` extra; MQTT 3.1.1). Devices: the ZVT terminal and locker-board simulators on loopback
TCP endpoints (the same bytes as a serial line). The gateway runs with a generated configuration
in a temporary directory; a simulated cloud backend acks events and sends signed commands;
simulated tills and a kiosk speak the store API. The story is printed as it happens and ends
with a table; exit 0 only when every check held.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devices.sim.locker_sim import LockerBoardSim
from devices.sim.store_client import StoreClient
from devices.sim.zvt_sim import ZvtSimulator
from gateway.app import Gateway
from gateway.backend_sim import RecordingBackend
from gateway.clock import format_rfc3339, now_rfc3339
from gateway.config import parse_config
from gateway.logs import configure_logging
from gateway.signing import public_key_b64

STORE = "demo-store"
SKUS = {
    "4006381333931": ("pencil", 199),
    "4008789012345": ("notebook", 450),
    "4012345678901": ("headphones", 3999),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DemoBroker(Protocol):
    """A broker the demo can stop (an outage) and start again on the same port."""

    port: int
    protocol: Literal["5", "3.1.1"]
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class MosquittoBroker:
    """The local mosquitto, as a subprocess (killed for an outage)."""

    name = "mosquitto"
    protocol: Literal["5", "3.1.1"] = "5"

    def __init__(self, workdir: Path, exe: str) -> None:
        self.port = _free_port()
        self.exe = exe
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        )
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.exe, "-c", str(self.conf), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        await _wait_port(self.port)

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            await self.proc.wait()
            self.proc = None


class AmqttBroker:
    """An embedded amqtt broker in this process (MQTT 3.1.1)."""

    name = "amqtt (embedded)"
    protocol: Literal["5", "3.1.1"] = "3.1.1"

    def __init__(self) -> None:
        self.port = _free_port()
        self._broker: Any = None

    async def start(self) -> None:
        from amqtt.broker import Broker  # noqa: PLC0415 - optional extra

        self._broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )
        await self._broker.start()

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None


async def _wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        w.close()
        return
    raise RuntimeError(f"broker on port {port} did not start")


def make_broker(workdir: Path, kind: str = "auto") -> DemoBroker:
    """``mosquitto`` (from the PATH), ``embedded`` (amqtt), or ``auto``: mosquitto if present."""
    exe = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if kind == "mosquitto" or (kind == "auto" and exe):
        if not exe:
            raise SystemExit(
                "mosquitto is not installed (apt-get install mosquitto), try --broker embedded"
            )
        return MosquittoBroker(workdir, exe)
    try:
        import amqtt  # noqa: F401, PLC0415
    except ImportError:
        raise SystemExit(
            "the demo needs an MQTT broker: install mosquitto, or the embedded one with "
            "pip install 'store-gateway[demo]'"
        ) from None
    return AmqttBroker()


@dataclass(slots=True)
class Story:
    """Prints the story and keeps the checks."""

    speed: float
    t0: float = field(default_factory=time.monotonic)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    drain_s: float = float("nan")

    def say(self, who: str, text: str) -> None:
        """One line of the story."""
        elapsed = time.monotonic() - self.t0
        print(f"  {int(elapsed // 60):02d}:{elapsed % 60:04.1f}  {who:<14} {text}", flush=True)

    def check(self, what: str, ok: bool) -> bool:
        """Record a check; print it only when it failed."""
        self.checks.append((what, ok))
        if not ok:
            self.say("CHECK FAILED", what)
        return ok

    async def pause(self, seconds: float) -> None:
        """Let a human follow (shortened by --speed)."""
        await asyncio.sleep(seconds / self.speed)


def _money(minor: int) -> str:
    return f"{minor / 100:.2f} EUR"


@contextlib.asynccontextmanager
async def _gateway(
    cfg_dir: Path,
    *,
    cloud: DemoBroker,
    store: DemoBroker,
    zvt_port: int,
    locker_port: int,
    key_b64: str,
) -> AsyncIterator[Gateway]:
    config = parse_config(
        {
            "store": {"id": STORE, "name": "Demo Store"},
            "cloud": {
                "url": f"mqtt://127.0.0.1:{cloud.port}",
                "protocol": cloud.protocol,
                "keepalive_s": 10,
                "backoff_initial_s": 0.2,
                "backoff_max_s": 1.0,
                "resend_after_s": 5,
            },
            "store_bus": {
                "url": f"mqtt://127.0.0.1:{store.port}",
                "protocol": store.protocol,
                "keepalive_s": 10,
            },
            "storage": {"path": str(cfg_dir / "gateway.db")},
            "security": {"command_keys": [key_b64]},
            "clock": {"synced": "yes"},
            "control": {"socket": str(cfg_dir / "control.sock")},
            "discovery": {"enabled": False},  # a demo must not announce a store on the real LAN
            "payment_terminals": [
                {
                    "id": "pt-1",
                    "endpoint": f"socket://127.0.0.1:{zvt_port}",
                    "pos_terminals": ["pos-1", "pos-2"],
                    "t3_s": 2,
                    "t4_s": 20,
                    "status_interval_s": 30,
                }
            ],
            "locker_banks": [
                {
                    "id": "A",
                    "endpoint": f"socket://127.0.0.1:{locker_port}",
                    "poll_ms": 50,
                    "open_confirm_s": 1.0,
                    "compartments": [
                        {"number": 1, "size": "S", "unit": 1, "channel": 0},
                        {"number": 2, "size": "M", "unit": 1, "channel": 1},
                        {"number": 3, "size": "L", "unit": 1, "channel": 2},
                    ],
                }
            ],
        }
    )
    gw = Gateway(config)
    async with AsyncExitStack() as stack:
        await gw.build(stack)
        task = asyncio.get_running_loop().create_task(gw.serve(), name="gateway")
        try:
            await asyncio.wait_for(gw.ready.wait(), 15)
            yield gw
        finally:
            gw.request_stop()
            await task


async def _until(cond: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _recorded(
    backend: RecordingBackend, predicate: Callable[[Any], bool], timeout_s: float = 15.0
) -> bool:
    """True once the backend's record satisfies ``predicate`` (False after the timeout)."""
    try:
        await backend.wait_until(predicate, timeout_s)
    except TimeoutError:
        return False
    return True


async def _card_sale(
    story: Story, till: StoreClient, n: int, sku: str, qty: int
) -> dict[str, Any] | None:
    name, price = SKUS[sku]
    total = price * qty
    pay_id = f"pay-{till.owner}-{n:04d}"
    result = await till.request(
        "payment/request",
        {"request_id": pay_id, "kind": "purchase", "amount_minor": total, "currency": "EUR"},
    )
    steps = ", ".join(s["step"] for s in till.statuses.get(pay_id, []))
    story.say(
        till.owner,
        f"card payment {_money(total)}: {result['status']}"
        + (
            f" ({result.get('card_brand') or 'card'} {result.get('masked_pan', '')}, steps: {steps})"
            if result["status"] == "approved"
            else ""
        ),
    )
    if result["status"] != "approved":
        return result
    sale = await _sell(till, n, sku, qty, {"method": "card", "payment_ref": pay_id})
    story.say(
        till.owner,
        f"sale {sale['sale_id']}: {qty}× {name} — {sale['status']} (event seq {sale.get('seq')})",
    )
    return result


async def _sell(
    till: StoreClient, n: int, sku: str, qty: int, payment: dict[str, Any]
) -> dict[str, Any]:
    """Send one sale of ``qty`` x ``sku`` paid in full by ``payment``; its answer."""
    price = SKUS[sku][1]
    total = price * qty
    return await till.request(
        "sale",
        {
            "sale_id": f"{till.owner}-{n:04d}",
            "lines": [{"sku": sku, "qty": qty, "unit_price_minor": price}],
            "total_minor": total,
            "currency": "EUR",
            "payments": [{**payment, "amount_minor": total}],
            "completed_at": now_rfc3339(),
        },
    )


async def _cash_sale(story: Story, till: StoreClient, n: int, sku: str, qty: int) -> dict[str, Any]:
    name, price = SKUS[sku]
    sale = await _sell(till, n, sku, qty, {"method": "cash"})
    story.say(
        till.owner,
        f"cash sale {sale['sale_id']}: {qty}× {name}, {_money(price * qty)} — {sale['status']} (seq {sale.get('seq')})",
    )
    return sale


async def _story(workdir: Path, speed: float, broker: str) -> bool:
    story = Story(speed)
    key = Ed25519PrivateKey.generate()
    cloud, store = make_broker(workdir, broker), make_broker(workdir, broker)
    print(
        f"store-gateway demo — brokers: {cloud.name}; ZVT terminal and locker bank simulated on loopback\n",
        flush=True,
    )
    await cloud.start()
    await store.start()
    try:
        async with ZvtSimulator("socket") as zvt, LockerBoardSim((1,), transport="tcp") as lockers:
            zvt_port = int(zvt.endpoint.rsplit(":", 1)[1])
            locker_port = int(lockers.endpoint.rsplit(":", 1)[1])
            async with (
                _gateway(
                    workdir,
                    cloud=cloud,
                    store=store,
                    zvt_port=zvt_port,
                    locker_port=locker_port,
                    key_b64=public_key_b64(key),
                ) as gw,
                RecordingBackend("127.0.0.1", cloud.port, STORE, signing_key=key) as backend,
                StoreClient(store.port, "pos", "pos-1", protocol=store.protocol) as till1,
                StoreClient(store.port, "pos", "pos-2", protocol=store.protocol) as till2,
                StoreClient(
                    store.port, "lockers", "A", protocol=store.protocol, client_id="kiosk-A"
                ) as kiosk,
                StoreClient(
                    store.port, "lockers", "A", protocol=store.protocol, client_id="staff-1"
                ) as staff,
            ):
                await _until(lambda: gw.cloud.link.connected and gw.store_bus.link.connected)
                story.say(
                    "gateway", f"ready (boot {gw.boot_id[:8]}), cloud and store bus connected"
                )
                await _day(
                    story,
                    gw,
                    backend,
                    cloud=cloud,
                    zvt=zvt,
                    lockers=lockers,
                    till1=till1,
                    till2=till2,
                    kiosk=kiosk,
                    staff=staff,
                )
                await _until(
                    lambda: gw.outbox.acked_through >= gw.db.last_seq, 10
                )  # let the last ack land
                return _summary(story, gw, backend, zvt)
    finally:
        await cloud.stop()
        await store.stop()


async def _day(  # noqa: PLR0915 - the story reads top to bottom
    story: Story,
    gw: Gateway,
    backend: RecordingBackend,
    *,
    cloud: DemoBroker,
    zvt: ZvtSimulator,
    lockers: LockerBoardSim,
    till1: StoreClient,
    till2: StoreClient,
    kiosk: StoreClient,
    staff: StoreClient,
) -> None:
    # Morning: the cloud sends the stock.
    cid = await backend.send_command(
        "inventory.snapshot",
        {
            "snapshot_id": "morning",
            "as_of_seq": 0,
            "part": 1,
            "parts": 1,
            "items": [{"sku": s, "on_hand": 20} for s in SKUS],
        },
    )
    res = await backend.wait_for_result(cid)
    story.check("snapshot applied", res["status"] == "ok")
    story.say("cloud", f"inventory snapshot: {len(SKUS)} SKUs × 20 — {res['status']}")
    await story.pause(1)

    # Trading.
    story.check(
        "card sale approved",
        (await _card_sale(story, till1, 1, "4012345678901", 1) or {}).get("status") == "approved",
    )
    await story.pause(1)
    story.check(
        "cash sale accepted",
        (await _cash_sale(story, till2, 1, "4006381333931", 3))["status"] == "accepted",
    )
    await story.pause(1)
    zvt.faults.outcome = "decline"
    declined = await _card_sale(story, till1, 2, "4008789012345", 2)
    zvt.faults.outcome = "approve"
    story.check("declined card reported", (declined or {}).get("status") == "declined")
    await story.pause(1)
    stock = await till2.request("stock", {"request_id": "stock-1", "skus": list(SKUS)})
    story.say(
        "pos-2",
        "stock lookup: "
        + ", ".join(f"{SKUS[i['sku']][0]} {i['available']}" for i in stock["items"]),
    )
    story.check(
        "stock lookup reflects sales",
        {i["sku"]: i["on_hand"] for i in stock["items"]}["4006381333931"] == 17,
    )
    await story.pause(1)

    # Click and collect: an order arrives, staff loads it into a locker.
    order_id = "web-1001"
    cid = await backend.send_command(
        "order.pickup.create",
        {
            "order_id": order_id,
            "items": [{"sku": "4008789012345", "qty": 1}],
            "size": "S",
            "pickup_by": format_rfc3339(time.time() + 3 * 86400),
        },
    )
    story.check("order accepted", (await backend.wait_for_result(cid))["status"] == "ok")
    await _recorded(
        backend,
        lambda r: any(e["data"].get("order_id") == order_id for e in r.of_type("order.updated")),
    )
    story.say(
        "cloud", f"click & collect order {order_id} (1× notebook, size S): accepted, stock reserved"
    )
    load = await staff.request("load", {"request_id": "load-1", "order_id": order_id})
    compartment = load.get("compartment")
    story.say("staff", f"load {order_id}: {load['status']} — compartment {compartment} pops open")
    story.check(
        "compartment opened for loading", load["status"] == "opened" and compartment is not None
    )
    await story.pause(1)
    channel = int(compartment or 1) - 1
    lockers.close_door(1, channel)
    story.say("staff", f"parcel in, door {compartment} closed")
    ok = await _recorded(
        backend,
        lambda r: any(e["data"].get("status") == "in_locker" for e in r.of_type("order.updated")),
    )
    in_locker = [
        e for e in backend.record.of_type("order.updated") if e["data"].get("status") == "in_locker"
    ]
    code = in_locker[-1]["data"].get("pickup_code") if in_locker else None
    story.check("order in locker with a pickup code", ok and bool(code))
    story.say(
        "cloud", f"order {order_id} in locker A/{compartment}; customer notified with code {code}"
    )
    await story.pause(1)

    # The internet goes down during trading.
    await cloud.stop()
    outage_start = time.monotonic()
    story.say("network", "!! cloud unreachable — the store keeps trading")
    await _until(lambda: not gw.cloud.link.connected, 15)
    await _cash_sale(story, till1, 3, "4008789012345", 1)
    story.check(
        "card sale offline",
        (await _card_sale(story, till2, 2, "4006381333931", 2) or {}).get("status") == "approved",
    )
    await _cash_sale(story, till2, 3, "4012345678901", 1)
    t_rush = time.monotonic()
    rush = await asyncio.gather(
        *(
            _sell(till, 100 + i, "4006381333931", 1, {"method": "cash"})
            for till in (till1, till2)
            for i in range(40)
        )
    )
    accepted = sum(1 for r in rush if r["status"] == "accepted")
    story.say(
        "pos-1, pos-2",
        f"rush hour: {accepted} cash sales accepted in {time.monotonic() - t_rush:.1f} s, offline",
    )
    story.check("rush-hour sales accepted offline", accepted == len(rush))
    wrong = await kiosk.request(
        "pickup", {"request_id": "pick-0", "code": "000000" if code != "000000" else "111111"}
    )
    story.say("kiosk A", f"customer types a wrong code: {wrong['status']}")
    pick = await kiosk.request("pickup", {"request_id": "pick-1", "code": code})
    story.say(
        "kiosk A",
        f"customer enters {code}: {pick['status']} — compartment {pick.get('compartment')} opens",
    )
    story.check("pickup works offline", pick["status"] == "opened")
    await story.pause(0.5)
    lockers.close_door(1, channel)
    story.say("kiosk A", "parcel taken, door closed")
    await story.pause(1)
    held = gw.db.last_seq - gw.outbox.acked_through
    story.say("gateway", f"{held} events held durably while offline (last seq {gw.db.last_seq})")

    # The internet comes back: catch-up.
    await cloud.start()
    back = time.monotonic()
    story.say("network", f"cloud reachable again after {back - outage_start:.1f} s")
    await _until(lambda: gw.cloud.link.connected, 20)
    target = gw.db.last_seq
    caught_up = await _until(
        lambda: backend.record.contiguous >= target and gw.outbox.acked_through >= target, 30
    )
    story.drain_s = time.monotonic() - back
    story.check("catch-up complete", caught_up)
    story.say("cloud", f"caught up: {target} events in order, drain took {story.drain_s:.1f} s")
    collected = any(
        e["data"].get("status") == "collected" for e in backend.record.of_type("order.updated")
    )
    story.check("order collected reached the cloud", collected)


def _summary(story: Story, gw: Gateway, backend: RecordingBackend, zvt: ZvtSimulator) -> bool:
    rec = backend.record
    committed = gw.db.last_seq
    lost = [s for s in range(1, committed + 1) if s not in rec.events]
    sales = rec.of_type("sale.completed")
    sale_ids = [e["data"]["sale_id"] for e in sales]
    dup_applied = len(sale_ids) - len(set(sale_ids))
    approved = [e for e in rec.of_type("payment.completed") if e["data"]["status"] == "approved"]
    booked = [e for e in zvt.ledger if e.kind == "authorization" and e.result_code == 0]
    story.check("no event lost", not lost and not rec.gaps())
    story.check("no payload changed", not rec.changed_ids and not rec.seq_reused)
    story.check("no duplicate applied", dup_applied == 0)
    story.check("charges booked = approved payments", len(booked) == len(approved))
    rows = [
        ("events committed", str(committed)),
        ("events sent (PUBACKed)", str(gw.outbox.sent_through)),
        ("events acked by the cloud", str(gw.outbox.acked_through)),
        (
            "events received by the cloud",
            f"{len(rec.events)} ({rec.deliveries} deliveries, {rec.duplicates} resent)",
        ),
        ("lost", str(len(lost))),
        ("duplicates applied", str(dup_applied)),
        ("card charges booked / approved", f"{len(booked)} / {len(approved)}"),
        ("drain time after the outage", f"{story.drain_s:.1f} s"),
    ]
    print("\n  " + "\n  ".join(f"{k:<32} {v}" for k, v in rows))
    failed = [what for what, ok in story.checks if not ok]
    print(
        f"\n  {len(story.checks) - len(failed)}/{len(story.checks)} checks held"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return not failed


def run_demo(*, speed: float = 1.0, keep: bool = False, broker: str = "auto") -> int:
    """Run the demonstration; exit 0 only when every check held."""
    configure_logging("error", "console", sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="store-gateway-demo-"))
    try:
        ok = asyncio.run(_story(workdir, max(speed, 0.01), broker))
    finally:
        if keep:
            print(f"\n  kept {workdir} (database, broker configs)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\ndemo: every check held" if ok else "\ndemo: a check FAILED")
    return 0 if ok else 1
