"""Click-and-collect lockers: staff loading, customer pickup, retrieval, remote and test openings.

Store-bus requests ``store/v1/lockers/{bank}/load|pickup|retrieve`` (store-api.md), the cloud
command ``locker.open``, the retained ``store/v1/lockers/{bank}/state`` and the locker events of
cloud-api.md. Every state change commits together with its outbox event.

Physical actions: an opening is recorded in ``locker_actions`` as ``pending`` together with the
``locker.opened`` audit of its first pulse, and every pulse's audit commits before that pulse
(``before_pulse``). The state change that follows marks the action done in the same unit of
work. An action still ``pending`` at start-up had its outcome lost in a crash: it is reported
(an error log and ``device.status error`` with the details), never repeated; a loading
compartment becomes ``out_of_order`` for staff, an order keeps its state, and a ``locker.open``
command sent again with the same id is answered ``failed``/``outcome-unknown``.

All mutations run under one lock (a store has few banks and few openings a minute); the door
wait of a load runs outside it, in a task owned by :meth:`LockerService.run`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from devices.errors import DeviceError
from devices.locker import LockerBank, LockerBankSettings, LockerEvent, LockerEventKind
from gateway import pickup_codes as codes
from gateway.clock import uuid7
from gateway.commands import Command, CommandSpec, Outcome
from gateway.config import LockersSection
from gateway.crashpoints import crash_point
from gateway.db import Database, EventDraft, SeqOf, Statement, Work
from gateway.errors import GatewayError, LinkUnavailable, StorageError
from gateway.inventory import Move
from gateway.linkstate import LinkState
from gateway.orders import (
    SIZES,
    CancelData,
    CompartmentState,
    CreateData,
    Order,
    OrderService,
    OrderStatus,
    OrderStore,
    set_compartment,
    set_status,
    updated_event,
)
from gateway.storebus import Request, RequestError, Route, StoreBus

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger(__name__)

State = CompartmentState
Reply = dict[str, Any]
By = Literal["load", "pickup", "retrieve", "remote", "technician"]


class UnknownCompartment(GatewayError):
    """No such bank, or no such compartment in it."""


# --- inbound requests (the edge) --------------------------------------------------------------


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    request_id: str


class LoadRequest(_Req):
    """``lockers/{bank}/load``."""

    order_id: str = Field(min_length=1, max_length=64)


class PickupRequest(_Req):
    """``lockers/{bank}/pickup``."""

    code: str = Field(pattern=r"^[0-9]{6}$")


class RetrieveRequest(_Req):
    """``lockers/{bank}/retrieve``."""

    compartment: int = Field(ge=1)


class OpenData(BaseModel):
    """``locker.open`` command data."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    bank: str = Field(min_length=1, max_length=32)
    compartment: int = Field(ge=1)
    reason: str = Field(max_length=500)


@dataclass(frozen=True, slots=True)
class OpenResult:
    """Outcome of one opening: ``opened``, ``jammed`` or ``device_offline``."""

    status: Literal["opened", "jammed", "device_offline"]
    action_id: str

    @property
    def opened(self) -> bool:
        """True when the door was seen open."""
        return self.status == "opened"


# --- the service ------------------------------------------------------------------------------


class LockerService:
    """Owns the banks' drivers, the locker routes and commands, and their background loops."""

    def __init__(
        self,
        gw: Gateway,
        banks: Sequence[LockerBankSettings],
        rules: LockersSection,
        *,
        now: Callable[[], float] = time.time,
        hash_params: codes.ScryptParams = codes.DEFAULT_PARAMS,
    ) -> None:
        self.gw = gw
        self.db: Database = gw.db
        self.bus: StoreBus = gw.store_bus
        self.rules = rules
        self.lockout = codes.LockoutRules(
            rules.wrong_code_limit, rules.wrong_code_window_s, rules.lockout_s
        )
        self._now = now
        self._hash_params = hash_params
        self.lock = asyncio.Lock()
        self.store = OrderStore(self.db)
        self.orders = OrderService(
            self.db, gw.inventory, gw.clock, self.lock, self.mark_dirty, now=now
        )
        self.settings = {b.id: b for b in banks}
        self.banks: dict[str, LockerBank] = {}
        self._keypads: dict[str, codes.KeypadState] = {}
        self._dirty: set[str] = set(self.settings)
        self._publish = asyncio.Event()
        self._status = asyncio.Event()
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._log = log

    async def open(self, stack: AsyncExitStack) -> None:
        """Enter every bank's driver on the stack and load the keypad states."""
        for settings in self.settings.values():
            bank = LockerBank(settings, self._on_locker_event)
            self.banks[settings.id] = await stack.enter_async_context(bank)
            bank.add_state_listener(lambda _n, _v: self._status.set())
        for bank_id, failures, locked_until in await self.db.fetchall(
            "SELECT bank, failures, locked_until FROM locker_keypads"
        ):
            self._keypads[str(bank_id)] = codes.load_state(failures, locked_until)
        self.bus.link.state.listeners.append(self._on_store_bus_state)

    def register(self) -> None:
        """Add the store-bus routes and the cloud commands."""
        for action, model, handler in (
            ("load", LoadRequest, self._load),
            ("pickup", PickupRequest, self._pickup),
            ("retrieve", RetrieveRequest, self._retrieve),
        ):
            self.bus.add_route(
                Route("lockers", action, "request_id", model, handler, f"{action}/result")
            )
        reg = self.gw.dispatcher.register
        reg("order.pickup.create", CommandSpec(self._cmd(self.orders.create), CreateData))
        reg("order.pickup.cancel", CommandSpec(self._cmd(self.orders.cancel), CancelData))
        reg("locker.open", CommandSpec(self._remote_open, OpenData, physical=True))

    def _cmd(
        self, handler: Callable[[Command, Any], Awaitable[Outcome]]
    ) -> Callable[[Command, Any], Awaitable[Outcome]]:
        async def run(cmd: Command, data: Any) -> Outcome:
            await self._ready.wait()
            return await handler(cmd, data)

        return run

    def health(self) -> dict[str, Any]:
        """The banks for the health report."""
        return {
            "devices": [
                {"device_id": b, "kind": "locker", "state": bank.state.value}
                for b, bank in self.banks.items()
            ]
        }

    # --- supervision ------------------------------------------------------------------------

    async def run(self) -> None:
        """Report lost outcomes, then run the drivers, the state publisher and the timers."""
        await self._recover()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for bank_id, bank in self.banks.items():
                    tg.create_task(bank.run(), name=f"locker-bank-{bank_id}")
                tg.create_task(self._publish_loop(), name="locker-state")
                tg.create_task(self._status_loop(), name="locker-status")
                tg.create_task(self.orders.run_expiry(), name="order-expiry")
                self._ready.set()
                await self._stop.wait()
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            self._tg = None

    def request_stop(self) -> None:
        """Stop the loops (a load still waiting for its door is reported at the next start)."""
        self._stop.set()

    async def _recover(self) -> None:
        rows = await self.db.fetchall(
            "SELECT action_id, bank, compartment, opened_by, ref FROM locker_actions "
            "WHERE state = 'pending'"
        )
        for action_id, bank, number, by, ref in rows:
            detail = (
                f"compartment {number}: outcome of a lock pulse (by {by}, ref {ref}) was lost "
                "in a restart; not repeated, check the door"
            )
            log.error("locker pulse outcome unknown", bank=bank, compartment=number, by=by, ref=ref)
            stmts: list[Statement] = [_action_state(action_id, "unknown")]
            if by == "load":  # the order stays accepted; staff check the compartment
                stmts += [
                    set_compartment(bank, number, State.OUT_OF_ORDER),
                    _assign(ref, None, None),
                ]
            event = self.db.draft(
                "device.status",
                {"device_id": bank, "kind": "locker", "state": "error", "detail": detail},
            )
            await self.db.submit(Work(events=[event], statements=stmts, refusable=False))

    # --- events from the drivers ------------------------------------------------------------

    async def _on_locker_event(self, event: LockerEvent) -> None:
        self.mark_dirty(event.bank)
        if event.kind in (LockerEventKind.BOARD_OFFLINE, LockerEventKind.BOARD_ONLINE):
            self._status.set()
        if not event.is_alert:
            return
        await self._alert(event.bank, event.kind.value, event.compartment)

    async def _alert(self, bank: str, alert: str, compartment: int | None) -> None:
        data: dict[str, Any] = {"bank": bank, "alert": alert}
        if compartment is not None:
            data["compartment"] = compartment
        log.warning("locker alert", bank=bank, alert=alert, compartment=compartment)
        try:
            await self.db.submit(
                Work(events=[self.db.draft("locker.alert", data)], refusable=False)
            )
        except StorageError as err:  # the driver's poll loop must go on
            log.error("locker alert not recorded", bank=bank, alert=alert, error=str(err))

    async def _status_loop(self) -> None:
        reported: dict[str, str] = {}
        while True:
            await self._status.wait()
            self._status.clear()
            for bank_id, bank in self.banks.items():
                state = bank.state.value
                if reported.get(bank_id) == state:
                    continue
                self.mark_dirty(bank_id)
                try:
                    await self.gw.device_status(bank_id, "locker", state)
                except StorageError as err:
                    log.error("device.status not recorded", bank=bank_id, error=str(err))
                    continue
                reported[bank_id] = state

    # --- retained state ---------------------------------------------------------------------

    def mark_dirty(self, bank: str) -> None:
        """Republish ``bank``'s retained state soon."""
        self._dirty.add(bank)
        self._publish.set()

    def _on_store_bus_state(self, _name: str, value: str) -> None:
        if value == LinkState.CONNECTED:
            for bank in self.settings:
                self.mark_dirty(bank)

    async def _publish_loop(self) -> None:
        self._publish.set()
        while True:
            await self._publish.wait()
            self._publish.clear()
            dirty, self._dirty = self._dirty, set()
            for bank in sorted(dirty):
                body = await self.state_of(bank)
                try:
                    await self.bus.publish_json(f"store/v1/lockers/{bank}/state", body, retain=True)
                except LinkUnavailable:
                    self._dirty.add(bank)  # sent again when the store bus reconnects
                _raise_if_cancelling()

    async def state_of(self, bank_id: str) -> dict[str, Any]:
        """The retained state body of one bank."""
        bank = self.banks[bank_id]
        recorded = await self.store.compartments(bank_id)
        wire = {
            State.FREE: "free",
            State.LOADING: "reserved",
            State.OCCUPIED: "occupied",
            State.RETRIEVE: "occupied",
            State.OUT_OF_ORDER: "out_of_order",
        }
        out = []
        for c in bank.settings.compartments:
            door = bank.door_open(c.number)
            state = wire[recorded.get(c.number, (State.FREE, None))[0]]
            if door is None:
                state = "out_of_order"
            elif door:
                state = "open"
            out.append({"number": c.number, "size": c.size, "state": state})
        return {"compartments": out}

    # --- openings ---------------------------------------------------------------------------

    async def _open(
        self,
        bank: LockerBank,
        number: int,
        by: By,
        ref: str | None,
        first: Sequence[Statement] = (),
    ) -> OpenResult:
        """Open with a committed audit before every pulse; ``first`` commits with the first."""
        action_id = uuid7()
        bank_id = bank.settings.id
        pulses = 0

        async def before_pulse(try_no: int) -> None:
            nonlocal pulses
            pulses = try_no
            data: dict[str, Any] = {"bank": bank_id, "compartment": number, "by": by}
            if ref is not None:
                data["ref"] = ref
            stmts: list[Statement] = []
            if try_no == 1:
                stmts = [
                    (
                        "INSERT INTO locker_actions(action_id, bank, compartment, opened_by, ref, "
                        "state, seq) VALUES (?, ?, ?, ?, ?, 'pending', ?)",
                        (action_id, bank_id, number, by, ref or "", SeqOf(0)),
                    ),
                    *first,
                ]
            event = self.db.draft("locker.opened", data)
            await self.db.submit(Work(events=[event], statements=stmts, refusable=False))

        try:
            opened = await bank.open_compartment(number, before_pulse=before_pulse)
        except DeviceError as err:
            log.warning("locker opening failed", bank=bank_id, compartment=number, error=str(err))
            return OpenResult("device_offline", action_id)
        crash_point("locker-after-pulse")
        if pulses == 0 and first:  # the door was open already: no pulse, no audit
            await self.db.submit(Work(statements=first, refusable=False))
        return OpenResult("opened" if opened else "jammed", action_id)

    async def action_open(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """Control-socket action ``locker.open`` {bank, compartment}: a technician test pulse."""
        bank, compartment = args.get("bank"), args.get("compartment")
        if (
            not isinstance(bank, str)
            or isinstance(compartment, bool)
            or not isinstance(compartment, int | str)
        ):
            raise ValueError("locker.open needs bank (string) and compartment (number)")
        try:
            result = await self.technician_open(bank, int(compartment), uid)
        except (UnknownCompartment, ValueError) as err:
            raise ValueError(str(err)) from err
        if result.opened:
            return {"bank": bank, "compartment": int(compartment), "status": result.status}
        return {
            "ok": False,
            "error": {"code": result.status, "message": f"{bank}/{compartment}: {result.status}"},
        }

    async def technician_open(self, bank: str, compartment: int, uid: int) -> OpenResult:
        """A technician's test opening (control socket); an out-of-order empty one returns to use."""
        locker = self._locker(bank, compartment)
        await self._ready.wait()
        async with self.lock:
            if not _board_up(locker, compartment):
                return OpenResult("device_offline", "")
            result = await self._open(locker, compartment, "technician", f"uid:{uid}")
            stmts = [_action_state(result.action_id, _final(result))]
            state, holder = await self.store.compartment(bank, compartment)
            if result.opened and state is State.OUT_OF_ORDER and holder is None:
                stmts.append(set_compartment(bank, compartment, State.FREE))
            await self.db.submit(Work(statements=stmts, refusable=False))
        self.mark_dirty(bank)
        log.info(
            "technician opening", bank=bank, compartment=compartment, uid=uid, status=result.status
        )
        return result

    async def _remote_open(self, cmd: Command, data: OpenData) -> Outcome:
        await self._ready.wait()
        try:
            locker = self._locker(data.bank, data.compartment)
        except UnknownCompartment as err:
            return Outcome("rejected", "unknown-compartment", str(err))
        async with self.lock:
            prior = await self.db.fetchone(
                "SELECT state FROM locker_actions WHERE opened_by = 'remote' AND ref = ?", (cmd.id,)
            )
            if prior is not None:
                return Outcome("failed", "outcome-unknown", "an earlier attempt's outcome was lost")
            if not _board_up(locker, data.compartment):
                return Outcome("failed", "device-offline", f"bank {data.bank} is offline")
            result = await self._open(locker, data.compartment, "remote", cmd.id)
        self.mark_dirty(data.bank)
        log.info("remote opening", bank=data.bank, reason=data.reason, status=result.status)
        done = (_action_state(result.action_id, _final(result)),)
        if not result.opened:
            reason = result.status.replace("_", "-")
            return Outcome("failed", reason, f"compartment {data.compartment}", statements=done)
        body = {"bank": data.bank, "compartment": data.compartment}
        return Outcome(data=body, statements=done)

    def _locker(self, bank: str, compartment: int) -> LockerBank:
        locker = self.banks.get(bank)
        if locker is None:
            raise UnknownCompartment(f"no locker bank {bank!r}")
        if compartment not in {c.number for c in locker.settings.compartments}:
            raise UnknownCompartment(f"bank {bank} has no compartment {compartment}")
        return locker

    # --- store-bus requests -----------------------------------------------------------------

    async def _begin(self, req: Request, action: str) -> tuple[LockerBank, Reply | None]:
        await self._ready.wait()
        bank = self.banks.get(req.owner)
        if bank is None:
            raise RequestError("unknown-bank", f"no locker bank {req.owner!r}")
        row = await self.db.fetchone(
            "SELECT reply FROM locker_requests WHERE bank = ? AND action = ? AND request_id = ?",
            (req.owner, action, req.request_id),
        )
        return bank, (json.loads(row[0]) if row else None)

    def _remember(self, req: Request, action: str, reply: Reply) -> Statement:
        return (
            "INSERT OR IGNORE INTO locker_requests(bank, action, request_id, reply, at) "
            "VALUES (?, ?, ?, ?, ?)",
            (req.owner, action, req.request_id, json.dumps(reply), self._now()),
        )

    async def _answer(
        self,
        req: Request,
        action: str,
        reply: Reply,
        stmts: Sequence[Statement] = (),
        events: Sequence[EventDraft] = (),
    ) -> Reply:
        await self.db.submit(
            Work(
                events=events,
                statements=[*stmts, self._remember(req, action, reply)],
                refusable=False,
            )
        )
        self.mark_dirty(req.owner)
        return reply

    async def _load(self, req: Request, body: LoadRequest) -> Reply:
        async with self.lock:
            bank, cached = await self._begin(req, "load")
            if cached is not None:
                return cached
            order = await self.store.get(body.order_id)
            reply: Reply = {"request_id": req.request_id}
            if order is None:
                return await self._answer(req, "load", reply | {"status": "unknown_order"})
            if order.status is not OrderStatus.ACCEPTED or order.compartment is not None:
                return await self._answer(req, "load", reply | {"status": "wrong_state"})
            return await self._load_into(req, bank, order, reply)

    async def _load_into(self, req: Request, bank: LockerBank, order: Order, reply: Reply) -> Reply:
        bank_id = bank.settings.id
        offline = False
        for number in await self._candidates(bank, order.size):
            if not _board_up(bank, number):
                offline = True
                continue
            assign = [
                set_compartment(bank_id, number, State.LOADING, order.order_id),
                _assign(order.order_id, bank_id, number),
            ]
            result = await self._open(bank, number, "load", order.order_id, assign)
            done = _action_state(result.action_id, _final(result))
            if result.opened:
                reply |= {"status": "opened", "compartment": number}
                await self._answer(req, "load", reply)
                assert self._tg is not None
                self._tg.create_task(
                    self._finish_load(bank, number, order.order_id, result.action_id),
                    name=f"load-{order.order_id}",
                )
                return reply
            # jammed or offline: that compartment is out of use for now, try the next one
            unassign = [_assign(order.order_id, None, None), done]
            if result.status == "jammed":
                unassign.append(set_compartment(bank_id, number, State.OUT_OF_ORDER))
            else:
                offline = True
                unassign.append(set_compartment(bank_id, number, State.FREE))
            await self.db.submit(Work(statements=unassign, refusable=False))
        status = "device_offline" if offline else "no_compartment"
        return await self._answer(req, "load", reply | {"status": status})

    async def _candidates(self, bank: LockerBank, size: str) -> list[int]:
        recorded = await self.store.compartments(bank.settings.id)
        rank = SIZES.index(size)
        fits = [
            c
            for c in bank.settings.compartments
            if SIZES.index(c.size) >= rank
            and recorded.get(c.number, (State.FREE, None))[0] is State.FREE
            and bank.door_open(c.number) is not True
        ]
        return [c.number for c in sorted(fits, key=lambda c: (SIZES.index(c.size), c.number))]

    async def _finish_load(
        self, bank: LockerBank, number: int, order_id: str, action_id: str
    ) -> None:
        """Wait for the door to close, then put the order ``in_locker`` with a fresh code."""
        closed = await bank.wait_closed(number, self.rules.load_close_timeout_s)
        bank_id = bank.settings.id
        async with self.lock:
            order = await self.store.get(order_id)
            done = _action_state(action_id, "done")
            if not closed:
                log.warning("loading abandoned: door not closed", bank=bank_id, compartment=number)
                stmts = [
                    done,
                    set_compartment(bank_id, number, State.FREE),
                    _assign(order_id, None, None),
                ]
                await self.db.submit(Work(statements=stmts, refusable=False))
            elif order is None or order.status is not OrderStatus.ACCEPTED:
                # cancelled or expired while loading: the parcel waits for staff
                stmts = [done, set_compartment(bank_id, number, State.RETRIEVE, order_id)]
                await self.db.submit(Work(statements=stmts, refusable=False))
            else:
                await self._in_locker(order, bank_id, number, done)
        self.mark_dirty(bank_id)

    async def _in_locker(self, order: Order, bank_id: str, number: int, done: Statement) -> None:
        taken = [o.code_hash for o in await self.store.with_codes(bank_id) if o.code_hash]
        code, hashed = await asyncio.to_thread(codes.unique_code, taken, self._hash_params)
        event = updated_event(self.db, order, OrderStatus.IN_LOCKER, pickup_code=code)
        stmts = [
            done,
            set_compartment(bank_id, number, State.OCCUPIED, order.order_id),
            (
                "UPDATE orders SET status = 'in_locker', code_hash = ?, seq = ? WHERE order_id = ?",
                (hashed.encode(), SeqOf(0), order.order_id),
            ),
        ]
        await self.db.submit(Work(events=[event], statements=stmts, refusable=False))
        log.info("order in locker", order_id=order.order_id, bank=bank_id, compartment=number)

    async def _pickup(self, req: Request, body: PickupRequest) -> Reply:
        async with self.lock:
            bank, cached = await self._begin(req, "pickup")
            if cached is not None:
                return cached
            bank_id = bank.settings.id
            reply: Reply = {"request_id": req.request_id}
            keypad = self._keypads.get(bank_id, codes.CLEAR)
            retry = keypad.retry_after_s(self._now())
            if retry is not None:
                return await self._answer(
                    req, "pickup", reply | {"status": "locked_out", "retry_after_s": retry}
                )
            candidates = [
                (o, o.code_hash) for o in await self.store.with_codes(bank_id) if o.code_hash
            ]
            found = await asyncio.to_thread(codes.matching, body.code, candidates)
            if not found:
                return await self._wrong_code(req, bank_id, keypad, reply)
            order = found[0]
            if order.status is OrderStatus.EXPIRED:
                return await self._answer(req, "pickup", reply | {"status": "expired"})
            assert order.compartment is not None
            return await self._hand_over(req, bank, order, order.compartment, reply)

    async def _wrong_code(
        self, req: Request, bank_id: str, keypad: codes.KeypadState, reply: Reply
    ) -> Reply:
        state, locked = keypad.after_failure(self.lockout, self._now())
        events = []
        if locked:
            log.warning("keypad locked", bank=bank_id, lockout_s=self.lockout.lockout_s)
            events.append(self.db.draft("locker.alert", {"bank": bank_id, "alert": "code_lockout"}))
        out = await self._answer(
            req,
            "pickup",
            reply | {"status": "invalid_code"},
            [codes.save_statement(bank_id, state)],
            events,
        )
        self._keypads[bank_id] = state
        return out

    async def _hand_over(
        self, req: Request, bank: LockerBank, order: Order, number: int, reply: Reply
    ) -> Reply:
        bank_id = bank.settings.id
        if not _board_up(bank, number):
            return await self._answer(req, "pickup", reply | {"status": "device_offline"})
        result = await self._open(bank, number, "pickup", order.order_id)
        done = _action_state(result.action_id, _final(result))
        if not result.opened:
            reply |= {"status": "device_offline", "compartment": number}
            return await self._answer(req, "pickup", reply, [done])
        reply |= {"status": "opened", "compartment": number}
        await self.gw.inventory.commit(
            events=[updated_event(self.db, order, OrderStatus.COLLECTED)],
            statements=[
                set_status(order.order_id, OrderStatus.COLLECTED),
                set_compartment(bank_id, number, State.FREE),
                done,
                codes.save_statement(bank_id, codes.CLEAR),
                self._remember(req, "pickup", reply),
            ],
            moves=[Move(sku, -qty, "pickup", order.order_id) for sku, qty in order.items],
            release=order.reservation,
            refusable=False,
        )
        self._keypads[bank_id] = codes.CLEAR
        self.mark_dirty(bank_id)
        log.info("order collected", order_id=order.order_id, bank=bank_id, compartment=number)
        return reply

    async def _retrieve(self, req: Request, body: RetrieveRequest) -> Reply:
        async with self.lock:
            bank, cached = await self._begin(req, "retrieve")
            if cached is not None:
                return cached
            bank_id = bank.settings.id
            try:
                self._locker(bank_id, body.compartment)
            except UnknownCompartment as err:
                raise RequestError("unknown-compartment", str(err)) from None
            number = body.compartment
            reply: Reply = {"request_id": req.request_id, "compartment": number}
            state, holder = await self.store.compartment(bank_id, number)
            if state not in (State.RETRIEVE, State.OUT_OF_ORDER):
                return await self._answer(req, "retrieve", reply | {"status": "wrong_state"})
            if not _board_up(bank, number):
                return await self._answer(req, "retrieve", reply | {"status": "device_offline"})
            result = await self._open(bank, number, "retrieve", holder)
            stmts = [_action_state(result.action_id, _final(result))]
            if result.opened:
                stmts.append(set_compartment(bank_id, number, State.FREE))
                if holder is not None:
                    stmts.append(
                        ("UPDATE orders SET code_hash = NULL WHERE order_id = ?", (holder,))
                    )
            status = "opened" if result.opened else "device_offline"
            return await self._answer(req, "retrieve", reply | {"status": status}, stmts)


class _Stopped(Exception):
    """Ends the service's TaskGroup on request_stop."""


def _raise_if_cancelling() -> None:
    """Re-raise a cancel that Python 3.11's ``asyncio.wait_for`` (inside aiomqtt) dropped.

    When a PUBACK and a cancel arrive together, 3.11's ``wait_for`` returns the result and the
    cancel is lost; the task is still marked as cancelling, so honour that here.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _board_up(bank: LockerBank, number: int) -> bool:
    return bank.door_open(number) is not None


def _final(result: OpenResult) -> str:
    return "done" if result.status != "device_offline" else "failed"


def _action_state(action_id: str, state: str) -> Statement:
    return ("UPDATE locker_actions SET state = ? WHERE action_id = ?", (state, action_id))


def _assign(order_id: str, bank: str | None, number: int | None) -> Statement:
    return (
        "UPDATE orders SET bank = ?, compartment = ? WHERE order_id = ?",
        (bank, number, order_id),
    )


async def install(gw: Gateway, stack: AsyncExitStack) -> None:
    """Installer (gateway.services): banks, routes, commands, the supervised loop, health."""
    from gateway.app import Supervised  # noqa: PLC0415 - app imports the service registry

    service = LockerService(gw, gw.config.locker_banks, gw.config.lockers)
    await service.open(stack)
    service.register()
    gw.actions["locker.open"] = service.action_open
    gw.components.append(Supervised("lockers", service))
    gw.extra_health.append(service.health)


def locker_service(gw: Gateway) -> LockerService:
    """The gateway's locker service (for the control socket); LookupError when not installed."""
    for supervised in gw.components:
        if isinstance(supervised.component, LockerService):
            return supervised.component
    raise LookupError("the locker service is not installed")
