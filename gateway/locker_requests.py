"""Store-bus locker requests: staff loading, customer pickup, staff retrieval.

``store/v1/lockers/{bank}/load|pickup|retrieve`` (store-api.md). The first answer to a request
id is stored in ``locker_requests`` with the state change it reports and repeated for that id;
answers older than :data:`REPLY_KEEP_S` are pruned at start-up and once a day (while the clock
is synchronised: a clock running ahead would forget ids early). The door wait of a load runs
outside the lock, in a task spawned into the service's TaskGroup.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

from devices.locker import LockerBank
from gateway import pickup_codes as codes
from gateway.db import EventDraft, SeqOf, Statement, Work
from gateway.errors import StorageError
from gateway.inventory import Move
from gateway.locker_openings import (
    Openings,
    UnknownCompartment,
    action_state,
    assign,
    board_up,
    final_state,
)
from gateway.orders import (
    SIZES,
    CompartmentState,
    Order,
    OrderStatus,
    OrderStore,
    set_compartment,
    set_status,
    updated_event,
)
from gateway.storebus import Request, RequestError, Route

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.config import LockersSection

log = structlog.get_logger(__name__)

State = CompartmentState
Reply = dict[str, Any]
Spawn = Callable[[Coroutine[Any, Any, None], str], None]

REPLY_KEEP_S = 7 * 86_400.0  # a till or kiosk repeats a request within minutes, not days
PRUNE_EVERY_S = 86_400.0


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


class LockerRequests:
    """The load, pickup and retrieve handlers and their stored answers."""

    def __init__(
        self,
        gw: Gateway,
        openings: Openings,
        rules: LockersSection,
        *,
        lock: asyncio.Lock,
        ready: asyncio.Event,
        mark_dirty: Callable[[str], None],
        spawn: Spawn,
        now: Callable[[], float],
        hash_params: codes.ScryptParams,
    ) -> None:
        self.gw = gw
        self.db = gw.db
        self.openings = openings
        self.banks = openings.banks
        self.store = OrderStore(self.db)
        self.rules = rules
        self.lockout = codes.LockoutRules(
            rules.wrong_code_limit, rules.wrong_code_window_s, rules.lockout_s
        )
        self._lock = lock
        self._ready = ready
        self._mark_dirty = mark_dirty
        self._spawn = spawn
        self._now = now
        self._hash_params = hash_params
        self._keypads: dict[str, codes.KeypadState] = {}

    async def load_keypads(self) -> None:
        """Read the keypads' wrong-code states."""
        for bank_id, failures, locked_until in await self.db.fetchall(
            "SELECT bank, failures, locked_until FROM locker_keypads"
        ):
            self._keypads[str(bank_id)] = codes.load_state(failures, locked_until)

    def routes(self) -> list[Route]:
        """The store-bus routes of the three requests."""
        return [
            Route("lockers", action, "request_id", model, handler, f"{action}/result")
            for action, model, handler in (
                ("load", LoadRequest, self._load),
                ("pickup", PickupRequest, self._pickup),
                ("retrieve", RetrieveRequest, self._retrieve),
            )
        ]

    # --- stored answers -----------------------------------------------------------------------

    async def prune(self, keep_s: float = REPLY_KEEP_S) -> int:
        """Delete stored answers older than ``keep_s`` (clock synced only); returns how many."""
        if not self.gw.clock.synced():
            return 0
        cutoff = self._now() - keep_s
        try:
            row = await self.db.fetchone(
                "SELECT count(*) FROM locker_requests WHERE at < ?", (cutoff,)
            )
            count = int(row[0]) if row else 0
            if count:
                stmt = ("DELETE FROM locker_requests WHERE at < ?", (cutoff,))
                await self.db.submit(Work(statements=[stmt], refusable=False))
        except StorageError as err:  # only housekeeping: tried again at the next interval
            log.error("locker request answers not pruned", error=str(err))
            return 0
        if count:
            log.info("locker request answers pruned", count=count, keep_s=keep_s)
        return count

    async def run_pruning(self, every_s: float = PRUNE_EVERY_S) -> None:
        """Prune every ``every_s`` (the service prunes once at start-up itself)."""
        while True:
            await asyncio.sleep(every_s)
            await self.prune()

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
        self._mark_dirty(req.owner)
        return reply

    # --- load ---------------------------------------------------------------------------------

    async def _load(self, req: Request, body: LoadRequest) -> Reply:
        async with self._lock:
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
            if not board_up(bank, number):
                offline = True
                continue
            first = [
                set_compartment(bank_id, number, State.LOADING, order.order_id),
                assign(order.order_id, bank_id, number),
            ]
            result = await self.openings.open(bank, number, "load", order.order_id, first)
            done = action_state(result.action_id, final_state(result))
            if result.opened:
                reply |= {"status": "opened", "compartment": number}
                await self._answer(req, "load", reply)
                self._spawn(
                    self._finish_load(bank, number, order.order_id, result.action_id),
                    f"load-{order.order_id}",
                )
                return reply
            # jammed or offline: that compartment is out of use for now, try the next one
            unassign = [assign(order.order_id, None, None), done]
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
        async with self._lock:
            order = await self.store.get(order_id)
            done = action_state(action_id, "done")
            if not closed:
                log.warning("loading abandoned: door not closed", bank=bank_id, compartment=number)
                stmts = [
                    done,
                    set_compartment(bank_id, number, State.FREE),
                    assign(order_id, None, None),
                ]
                await self.db.submit(Work(statements=stmts, refusable=False))
            elif order is None or order.status is not OrderStatus.ACCEPTED:
                # cancelled or expired while loading: the parcel waits for staff
                stmts = [done, set_compartment(bank_id, number, State.RETRIEVE, order_id)]
                await self.db.submit(Work(statements=stmts, refusable=False))
            else:
                await self._in_locker(order, bank_id, number, done)
        self._mark_dirty(bank_id)

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

    # --- pickup -------------------------------------------------------------------------------

    async def _pickup(self, req: Request, body: PickupRequest) -> Reply:
        async with self._lock:
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
        if not board_up(bank, number):
            return await self._answer(req, "pickup", reply | {"status": "device_offline"})
        result = await self.openings.open(bank, number, "pickup", order.order_id)
        done = action_state(result.action_id, final_state(result))
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
        self._mark_dirty(bank_id)
        log.info("order collected", order_id=order.order_id, bank=bank_id, compartment=number)
        return reply

    # --- retrieve -----------------------------------------------------------------------------

    async def _retrieve(self, req: Request, body: RetrieveRequest) -> Reply:
        async with self._lock:
            bank, cached = await self._begin(req, "retrieve")
            if cached is not None:
                return cached
            bank_id = bank.settings.id
            try:
                self.openings.locker(bank_id, body.compartment)
            except UnknownCompartment as err:
                raise RequestError("unknown-compartment", str(err)) from None
            number = body.compartment
            reply: Reply = {"request_id": req.request_id, "compartment": number}
            state, holder = await self.store.compartment(bank_id, number)
            if state not in (State.RETRIEVE, State.OUT_OF_ORDER):
                return await self._answer(req, "retrieve", reply | {"status": "wrong_state"})
            if not board_up(bank, number):
                return await self._answer(req, "retrieve", reply | {"status": "device_offline"})
            result = await self.openings.open(bank, number, "retrieve", holder)
            stmts = [action_state(result.action_id, final_state(result))]
            if result.opened:
                stmts.append(set_compartment(bank_id, number, State.FREE))
                if holder is not None:
                    stmts.append(
                        ("UPDATE orders SET code_hash = NULL WHERE order_id = ?", (holder,))
                    )
            status = "opened" if result.opened else "device_offline"
            return await self._answer(req, "retrieve", reply | {"status": status}, stmts)
