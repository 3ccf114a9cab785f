"""Locker openings: one audited lock pulse, and the openings that are not a store-bus request.

Every opening is recorded in ``locker_actions`` as ``pending`` together with the
``locker.opened`` audit of its first pulse, and every pulse's audit commits before that pulse
(``before_pulse``). The state change that follows marks the action done in the same unit of
work. An action still ``pending`` at start-up had its outcome lost in a crash:
:func:`report_lost_outcomes` reports it (an error log and ``device.status error``), never
repeats it; a loading compartment becomes ``out_of_order`` for staff, an order keeps its state.

:class:`Openings` also serves the cloud command ``locker.open`` (a ``locker.open`` sent again
with the same id after a lost outcome is answered ``failed``/``outcome-unknown``) and the
technician's test opening of the control socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field

from devices.errors import DeviceError
from devices.locker import LockerBank
from gateway.clock import uuid7
from gateway.commands import Command, Outcome
from gateway.crashpoints import crash_point
from gateway.db import Database, SeqOf, Statement, Work
from gateway.errors import GatewayError
from gateway.orders import CompartmentState, OrderStore, set_compartment

log = structlog.get_logger(__name__)

State = CompartmentState
By = Literal["load", "pickup", "retrieve", "remote", "technician"]


class UnknownCompartment(GatewayError):
    """No such bank, or no such compartment in it."""


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


class Openings:
    """Audited pulses, the ``locker.open`` command and the technician's test opening."""

    def __init__(
        self,
        db: Database,
        banks: dict[str, LockerBank],
        lock: asyncio.Lock,
        ready: asyncio.Event,
        mark_dirty: Callable[[str], None],
    ) -> None:
        self.db = db
        self.banks = banks  # filled by the service as it enters the drivers
        self.store = OrderStore(db)
        self._lock = lock
        self._ready = ready
        self._mark_dirty = mark_dirty

    def locker(self, bank: str, compartment: int) -> LockerBank:
        """The bank holding ``compartment``; UnknownCompartment when there is none."""
        locker = self.banks.get(bank)
        if locker is None:
            raise UnknownCompartment(f"no locker bank {bank!r}")
        if compartment not in {c.number for c in locker.settings.compartments}:
            raise UnknownCompartment(f"bank {bank} has no compartment {compartment}")
        return locker

    async def open(
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
        locker = self.locker(bank, compartment)
        await self._ready.wait()
        async with self._lock:
            if not board_up(locker, compartment):
                return OpenResult("device_offline", "")
            result = await self.open(locker, compartment, "technician", f"uid:{uid}")
            stmts = [action_state(result.action_id, final_state(result))]
            state, holder = await self.store.compartment(bank, compartment)
            if result.opened and state is State.OUT_OF_ORDER and holder is None:
                stmts.append(set_compartment(bank, compartment, State.FREE))
            await self.db.submit(Work(statements=stmts, refusable=False))
        self._mark_dirty(bank)
        log.info(
            "technician opening", bank=bank, compartment=compartment, uid=uid, status=result.status
        )
        return result

    async def remote_open(self, cmd: Command, data: OpenData) -> Outcome:
        """The cloud command ``locker.open``; a repeated id whose outcome was lost fails."""
        await self._ready.wait()
        try:
            locker = self.locker(data.bank, data.compartment)
        except UnknownCompartment as err:
            return Outcome("rejected", "unknown-compartment", str(err))
        async with self._lock:
            prior = await self.db.fetchone(
                "SELECT state FROM locker_actions WHERE opened_by = 'remote' AND ref = ?", (cmd.id,)
            )
            if prior is not None:
                return Outcome("failed", "outcome-unknown", "an earlier attempt's outcome was lost")
            if not board_up(locker, data.compartment):
                return Outcome("failed", "device-offline", f"bank {data.bank} is offline")
            result = await self.open(locker, data.compartment, "remote", cmd.id)
        self._mark_dirty(data.bank)
        log.info("remote opening", bank=data.bank, reason=data.reason, status=result.status)
        done = (action_state(result.action_id, final_state(result)),)
        if not result.opened:
            reason = result.status.replace("_", "-")
            return Outcome("failed", reason, f"compartment {data.compartment}", statements=done)
        body = {"bank": data.bank, "compartment": data.compartment}
        return Outcome(data=body, statements=done)


async def report_lost_outcomes(db: Database) -> None:
    """Report every action still ``pending`` (its outcome was lost in a crash); never repeat it."""
    rows = await db.fetchall(
        "SELECT action_id, bank, compartment, opened_by, ref FROM locker_actions "
        "WHERE state = 'pending'"
    )
    for action_id, bank, number, by, ref in rows:
        detail = (
            f"compartment {number}: outcome of a lock pulse (by {by}, ref {ref}) was lost "
            "in a restart; not repeated, check the door"
        )
        log.error("locker pulse outcome unknown", bank=bank, compartment=number, by=by, ref=ref)
        stmts: list[Statement] = [action_state(action_id, "unknown")]
        if by == "load":  # the order stays accepted; staff check the compartment
            stmts += [
                set_compartment(bank, number, State.OUT_OF_ORDER),
                assign(ref, None, None),
            ]
        event = db.draft(
            "device.status",
            {"device_id": bank, "kind": "locker", "state": "error", "detail": detail},
        )
        await db.submit(Work(events=[event], statements=stmts, refusable=False))


def board_up(bank: LockerBank, number: int) -> bool:
    """True when the board behind ``number`` answers (its door state is known)."""
    return bank.door_open(number) is not None


def final_state(result: OpenResult) -> str:
    """The ``locker_actions`` state an opening ends in."""
    return "done" if result.status != "device_offline" else "failed"


def action_state(action_id: str, state: str) -> Statement:
    """Set the state of one ``locker_actions`` row."""
    return ("UPDATE locker_actions SET state = ? WHERE action_id = ?", (state, action_id))


def assign(order_id: str, bank: str | None, number: int | None) -> Statement:
    """Assign an order to a compartment (or to none)."""
    return (
        "UPDATE orders SET bank = ?, compartment = ? WHERE order_id = ?",
        (bank, number, order_id),
    )
