"""The click-and-collect workload of the chaos runs: orders, staff, customers and locker boards.

A :class:`~devices.sim.locker_sim.LockerBoardSim` on TCP (it outlives every gateway restart) is
configured as bank :data:`BANK`. While the nemesis works:

- the backend creates orders (``order.pickup.create``), each command sent again with the same id
  every 2 s until its ``command.result`` arrives;
- staff load them (``lockers/{bank}/load``); the kiosk client resends a request with the same
  ``request_id`` every 1.5 s and after every reconnect until a final answer. ``opened`` → the
  staff closes the simulator's door after a short delay. No ``in_locker`` in the backend within a
  while → load again under a new id (the gateway answers ``wrong_state`` if it was loaded);
- the customer takes the pickup code from the ``order.updated in_locker`` event the backend
  received and picks up at the kiosk (``lockers/{bank}/pickup``, retried the same way), then
  closes the door;
- staff retrieve every compartment the retained state shows ``out_of_order`` (a lost outcome or
  a jam), and close any door left open for 2 s (someone walking by).

Everything each party asked and was told is kept for the invariants (:func:`tests.chaos.
invariants.check` reads :class:`LockerEvidence`). At the settle the workload stops creating
orders, drives every order to ``collected``, empties out-of-order compartments, closes every
door and waits for the retained state to show every compartment free.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiomqtt

from devices.sim.locker_sim import LockerBoardSim
from gateway.backend_sim import RecordingBackend
from gateway.clock import format_rfc3339
from tests.chaos.tills import SKUS
from tests.daemon import write_config

if TYPE_CHECKING:
    from tests.chaos.harness import Rig
    from tests.chaos.invariants import Evidence

BANK = "chaos-A"
UNITS = (1, 2)
# compartment -> (size, unit, channel): two boards on one bus
WIRING: dict[int, tuple[str, int, int]] = {
    1: ("S", 1, 0),
    2: ("S", 1, 1),
    3: ("M", 1, 2),
    4: ("M", 1, 3),
    5: ("L", 2, 0),
    6: ("L", 2, 1),
}
LEFT_OPEN_S = 2.0  # a door open this long is closed by whoever walks by
RETRYABLE_CODES = {"storage-error"}


def bank_section(endpoint: str) -> dict[str, Any]:
    """The bank's configuration: fast polls and short timeouts, so faults show within a run."""
    return {
        "id": BANK,
        "endpoint": endpoint,
        "compartments": [
            {"number": n, "size": s, "unit": u, "channel": ch} for n, (s, u, ch) in WIRING.items()
        ],
        "poll_ms": 30,
        "pulse_ms": 300,
        "response_timeout_ms": 80,
        "retries": 1,
        "open_confirm_s": 0.6,
        "jam_tries": 2,
        "door_left_open_s": 5.0,
        "forced_open_window_s": 1.0,
    }


# --- what the parties did (evidence for the invariants) -----------------------------------------


@dataclass(slots=True)
class KioskRequest:
    """One locker request (one ``request_id``) and every answer it got."""

    action: str  # load / pickup / retrieve
    request_id: str
    body: dict[str, Any]
    target: str  # the order id (load, pickup) or the compartment number (retrieve)
    sends: int = 0
    last_sent: float = 0.0
    answers: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None


@dataclass(slots=True)
class OrderPlan:
    """One click-and-collect order the backend created."""

    order_id: str
    items: list[tuple[str, int]]
    size: str
    command_id: str = ""
    created: str | None = None  # status of its command.result, None while none arrived
    stuck: str | None = None  # why the workload gave up on it (only at the end of the settle)


@dataclass(slots=True)
class LockerEvidence:
    """What the kiosk, the staff, the backend's orders and the boards saw."""

    bank: str
    wiring: dict[int, tuple[str, int, int]]
    orders: dict[str, OrderPlan]
    requests: list[KioskRequest]
    pulses: dict[int, int]  # accepted pulses per compartment, counted by the simulator
    doors_open: dict[int, bool]  # the simulator's doors at the end
    final_state: dict[int, str] | None  # the retained store/v1/lockers/{bank}/state at the end


# --- the kiosk / staff handheld ----------------------------------------------------------------


class Kiosk:
    """Locker requests on the store broker, resent with the same id until a final answer."""

    def __init__(self, port: int, bank: str, seed: int, retry_s: float = 1.5) -> None:
        self.port = port
        self.bank = bank
        self.seed = seed
        self.retry_s = retry_s
        self.requests: list[KioskRequest] = []
        self.state: dict[int, str] | None = None  # the latest retained bank state
        self.reconnects = 0
        self._pending: dict[tuple[str, str], tuple[KioskRequest, asyncio.Future[Any]]] = {}
        self._client: aiomqtt.Client | None = None
        self._n = 0

    async def run(self) -> None:
        """Connect, reconnect, resend; forever (cancelled by the workload)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._resend_loop(), name="kiosk-resend")
            while True:
                try:
                    async with aiomqtt.Client(
                        "127.0.0.1",
                        self.port,
                        identifier=f"chaos-kiosk-{self.bank}-{self.seed}",
                        keepalive=5,
                        timeout=3,
                        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
                    ) as client:
                        await client.subscribe(f"store/v1/lockers/{self.bank}/+/result", qos=1)
                        await client.subscribe(f"store/v1/lockers/{self.bank}/state", qos=1)
                        self._client = client
                        self.reconnects += 1
                        for req, _ in list(self._pending.values()):
                            await self._send(req)
                        async for message in client.messages:
                            self._on_message(str(message.topic), message.payload)
                except aiomqtt.MqttError:
                    pass
                finally:
                    self._client = None
                await asyncio.sleep(0.2)

    async def ask(self, action: str, target: str, **fields: Any) -> dict[str, Any]:
        """Send one request (a fresh id) and return its final answer."""
        self._n += 1
        rid = f"{action[0]}-{self.seed}-{self._n:05d}"
        req = KioskRequest(action, rid, {"request_id": rid, **fields}, target)
        self.requests.append(req)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[(action, rid)] = (req, future)
        await self._send(req)
        try:
            return dict(await future)
        finally:
            self._pending.pop((action, rid), None)

    async def _resend_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.25)
            for req, _ in list(self._pending.values()):
                if loop.time() - req.last_sent >= self.retry_s:
                    await self._send(req)

    async def _send(self, req: KioskRequest) -> None:
        req.last_sent = asyncio.get_running_loop().time()
        req.sends += 1
        client = self._client
        if client is None:
            return
        topic = f"store/v1/lockers/{self.bank}/{req.action}"
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(topic, json.dumps(req.body).encode(), qos=1)

    def _on_message(self, topic: str, payload: Any) -> None:
        try:
            body = json.loads(bytes(payload) if isinstance(payload, bytes | bytearray) else b"")
        except json.JSONDecodeError:
            return
        parts = topic.split("/")
        if parts[-1] == "state":
            if isinstance(body, dict) and isinstance(body.get("compartments"), list):
                self.state = {int(c["number"]): str(c["state"]) for c in body["compartments"]}
            return
        action = parts[-2]
        rid = body.get("request_id") if isinstance(body, dict) else None
        entry = self._pending.get((action, rid)) if isinstance(rid, str) else None
        if entry is None:
            return
        req, future = entry
        req.answers.append(body)
        if _retryable(body) or future.done():
            return
        req.final = body
        future.set_result(body)


def _retryable(body: dict[str, Any]) -> bool:
    if body.get("status") == "busy":
        return True
    error = body.get("error")
    return (
        body.get("status") == "rejected"
        and isinstance(error, dict)
        and error.get("code") in RETRYABLE_CODES
    )


# --- the backend's view, indexed incrementally -------------------------------------------------


class BackendView:
    """Command results, order updates and known SKUs from the backend's contiguous record."""

    def __init__(self, backend: RecordingBackend) -> None:
        self.record = backend.record
        self.results: dict[str, dict[str, Any]] = {}
        self.in_locker: dict[str, dict[str, Any]] = {}  # order id -> the in_locker event data
        self.skus: set[str] = set()  # SKUs with a stock movement: the gateway knows them
        self._upto = 0

    def refresh(self) -> None:
        """Index the events that became contiguous since the last call."""
        rec = self.record
        while self._upto < rec.contiguous:
            self._upto += 1
            env = rec.events[self._upto]
            data = env["data"]
            if env["type"] == "command.result" and isinstance(data.get("command_id"), str):
                self.results.setdefault(data["command_id"], data)
            elif env["type"] == "order.updated" and data.get("status") == "in_locker":
                self.in_locker.setdefault(data["order_id"], data)
            elif env["type"] == "inventory.changed":
                self.skus.add(data["sku"])

    async def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Poll until ``predicate()`` (after a refresh) holds; False after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        while True:
            self.refresh()
            if predicate():
                return True
            if loop.time() >= until:
                return False
            await asyncio.sleep(0.1)


# --- the workload ------------------------------------------------------------------------------


class LockersWorkload:
    """Orders through load and pickup under faults (the harness's ``Workload``)."""

    def __init__(self, seed: int, *, inflight: int = 3, pause_s: tuple[float, float] = (0.3, 1.0)):
        self.seed = seed
        self.rng = random.Random(seed * 7919)
        self.inflight = inflight
        self.pause_s = pause_s
        self.orders: dict[str, OrderPlan] = {}
        self.counts: Counter[str] = Counter()
        self._sim: LockerBoardSim | None = None
        self._kiosk: Kiosk | None = None
        self._view: BackendView | None = None
        self._rig: Rig | None = None
        self._stop_new = asyncio.Event()
        self._order_tasks: list[asyncio.Task[None]] = []
        self._background: list[asyncio.Task[None]] = []
        self._open_since: dict[int, float] = {}
        self._retrieving: set[int] = set()

    # --- harness hooks ------------------------------------------------------------------------

    async def configure(self, rig: Rig, stack: AsyncExitStack) -> None:
        """Before the first start: the boards, and the bank in the daemon's configuration."""
        sim = await stack.enter_async_context(LockerBoardSim(list(UNITS), transport="tcp"))
        self._sim = rig.lockers = sim
        rig.raw_config["locker_banks"] = [bank_section(sim.endpoint)]
        rig.raw_config["lockers"] = {"wrong_code_limit": 100, "load_close_timeout_s": 6}
        write_config(rig.config_path, rig.raw_config)

    async def start(self, rig: Rig, stack: AsyncExitStack) -> None:
        """The kiosk, the order producer, the staff and the doors' passers-by."""
        self._rig = rig
        self._kiosk = Kiosk(rig.store.port, BANK, rig.plan.seed)
        self._view = BackendView(rig.backend)
        stack.push_async_callback(self._cancel_all)
        for coro, name in (
            (self._kiosk.run(), "kiosk"),
            (self._produce(), "orders"),
            (self._staff(), "staff"),
            (self._passers_by(), "doors"),
        ):
            self._background.append(asyncio.get_running_loop().create_task(coro, name=name))

    async def settle(self, rig: Rig, timeout_s: float = 60.0) -> None:
        """Every order to its end, out-of-order compartments emptied, every door closed."""
        self._stop_new.set()
        self._raise_if_failed()
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        pending = [t for t in self._order_tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(1.0, until - loop.time()))
        for task in self._order_tasks:
            if not task.done():
                task.cancel()
        for task in self._order_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for plan in self.orders.values():
            if plan.stuck is None and plan.created is None:
                plan.stuck = "no command.result"
        # the staff loop empties out-of-order compartments; wait for all free and closed
        assert self._kiosk is not None and self._sim is not None
        while loop.time() < until + 20.0:
            self._raise_if_failed()
            for number in WIRING:
                self._close(number)
            state = self._kiosk.state
            if state is not None and set(state.values()) == {"free"} and not self._retrieving:
                break
            await asyncio.sleep(0.3)

    async def evidence(self, rig: Rig, ev: Evidence) -> None:
        """After the clean stop: the retained state as the broker holds it, the boards' tallies."""
        assert self._sim is not None and self._kiosk is not None
        await self._cancel_all()
        sim = self._sim
        ev.lockers = LockerEvidence(
            bank=BANK,
            wiring=dict(WIRING),
            orders=self.orders,
            requests=list(self._kiosk.requests),
            pulses={n: sim.pulse_count(u, ch) for n, (_s, u, ch) in WIRING.items()},
            doors_open={n: sim.door_is_open(u, ch) for n, (_s, u, ch) in WIRING.items()},
            final_state=await retained_state(rig.store.port, BANK),
        )
        rig.counts["locker kiosk reconnects"] = self._kiosk.reconnects
        rig.counts.update(self.counts)

    # --- the parties --------------------------------------------------------------------------

    async def _produce(self) -> None:
        n = 0
        while not self._stop_new.is_set():
            self._order_tasks = [t for t in self._order_tasks if not t.done() or _failed(t)]
            self._raise_if_failed()
            if sum(not t.done() for t in self._order_tasks) < self.inflight:
                n += 1
                task = asyncio.get_running_loop().create_task(self._order(n), name=f"order-{n}")
                self._order_tasks.append(task)
            await asyncio.sleep(self.rng.uniform(*self.pause_s))

    async def _order(self, n: int) -> None:
        assert self._view is not None and self._rig is not None
        view = self._view
        await view.wait(lambda: bool(view.skus), 60.0)  # an SKU the gateway knows (a till sold it)
        known = sorted(view.skus) or list(SKUS)
        skus = self.rng.sample(known, k=min(len(known), self.rng.randint(1, 2)))
        plan = OrderPlan(
            f"o-{self.seed}-{n:05d}",
            [(sku, self.rng.randint(1, 2)) for sku in skus],
            self.rng.choice(["S", "M", "L"]),
        )
        self.orders[plan.order_id] = plan
        if not await self._create(plan):
            return
        code = await self._load(plan)
        if code is None:
            return
        await asyncio.sleep(self.rng.uniform(0.1, 0.8))
        await self._pickup(plan, code)

    async def _create(self, plan: OrderPlan) -> bool:
        """``order.pickup.create``, sent again with the same id until its result arrives."""
        assert self._view is not None and self._rig is not None
        backend, view = self._rig.backend, self._view
        data = {
            "order_id": plan.order_id,
            "items": [{"sku": s, "qty": q} for s, q in plan.items],
            "size": plan.size,
            "pickup_by": format_rfc3339(time.time() + 3600),
            "customer_ref": f"cust-{plan.order_id}",
        }
        env = backend.command_envelope("order.pickup.create", data, expires_in_s=3600)
        plan.command_id = cid = str(env["id"])
        payload = json.dumps(env).encode()
        while True:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError, AssertionError):
                async with asyncio.timeout(3):
                    await backend.send_raw("order.pickup.create", payload)
            self.counts["order commands sent"] += 1
            if await view.wait(lambda: cid in view.results, 2.0):
                break
        plan.created = str(view.results[cid]["status"])
        return plan.created == "ok"

    async def _load(self, plan: OrderPlan) -> str | None:
        """Staff load until the backend has the order ``in_locker``; its pickup code."""
        assert self._kiosk is not None and self._view is not None
        view, oid = self._view, plan.order_id
        while True:
            view.refresh()
            if oid in view.in_locker:
                return str(view.in_locker[oid]["pickup_code"])
            reply = await self._kiosk.ask("load", oid, order_id=oid)
            status = reply.get("status")
            if status == "opened":
                self._close_later(int(reply["compartment"]))
            if status in ("opened", "wrong_state"):
                await view.wait(lambda: oid in view.in_locker, 8.0)
            elif status in ("device_offline", "no_compartment"):
                await asyncio.sleep(0.5)
            else:  # unknown_order, rejected: judged by the invariants
                plan.stuck = f"load answered {reply}"
                return None

    async def _pickup(self, plan: OrderPlan, code: str) -> None:
        """The customer at the kiosk until the door opens."""
        assert self._kiosk is not None
        while True:
            reply = await self._kiosk.ask("pickup", plan.order_id, code=code)
            status = reply.get("status")
            if status == "opened":
                self._close_later(int(reply["compartment"]))
                return
            if status == "device_offline":
                await asyncio.sleep(0.5)
            elif status == "locked_out":
                await asyncio.sleep(float(reply.get("retry_after_s", 1)))
            else:  # invalid_code, expired, rejected: judged by the invariants
                plan.stuck = f"pickup answered {reply}"
                return

    async def _staff(self) -> None:
        """Empty every compartment the kiosk screen shows out of order."""
        assert self._kiosk is not None
        while True:
            await asyncio.sleep(0.7)
            state = self._kiosk.state or {}
            broken = [n for n, s in sorted(state.items()) if s == "out_of_order"]
            if len(broken) == len(WIRING):
                continue  # the whole bank is offline: nothing to retrieve now
            for number in broken:
                self._retrieving.add(number)
                try:
                    reply = await self._kiosk.ask("retrieve", str(number), compartment=number)
                finally:
                    self._retrieving.discard(number)
                if reply.get("status") == "opened":
                    self.counts["locker retrieves opened"] += 1
                    self._close_later(number)

    async def _passers_by(self) -> None:
        """Close any door left open for :data:`LEFT_OPEN_S` (a pulse whose answer was lost)."""
        assert self._sim is not None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.25)
            now = loop.time()
            for number, (_size, unit, ch) in WIRING.items():
                if not self._sim.door_is_open(unit, ch):
                    self._open_since.pop(number, None)
                elif now - self._open_since.setdefault(number, now) >= LEFT_OPEN_S:
                    self.counts["locker doors closed by passers-by"] += 1
                    self._close(number)

    def _close_later(self, number: int) -> None:
        async def close() -> None:
            await asyncio.sleep(self.rng.uniform(0.2, 0.8))
            self._close(number)

        self._background.append(asyncio.get_running_loop().create_task(close()))

    def _close(self, number: int) -> None:
        assert self._sim is not None
        _size, unit, ch = WIRING[number]
        self._sim.close_door(unit, ch)
        self._open_since.pop(number, None)

    # --- housekeeping -------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        for task in [*self._background, *self._order_tasks]:
            if _failed(task):
                raise AssertionError(f"locker workload task {task.get_name()} failed") from (
                    task.exception()
                )

    async def _cancel_all(self) -> None:
        tasks = [*self._background, *self._order_tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _failed(task: asyncio.Task[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


async def retained_state(port: int, bank: str, timeout_s: float = 3.0) -> dict[int, str] | None:
    """The retained state of ``bank`` as a fresh subscriber gets it, or None."""
    with contextlib.suppress(TimeoutError, aiomqtt.MqttError):
        async with (
            asyncio.timeout(timeout_s),
            aiomqtt.Client("127.0.0.1", port, identifier=f"chaos-state-{bank}") as client,
        ):
            await client.subscribe(f"store/v1/lockers/{bank}/state", qos=1)
            async for message in client.messages:
                payload = message.payload
                if isinstance(payload, bytes | bytearray):
                    body = json.loads(payload)
                    return {int(c["number"]): str(c["state"]) for c in body["compartments"]}
    return None
