"""Card payments on ZVT terminals: POS requests, the commit point, recovery, end-of-day.

Per payment (devices.md "Commit point")::

    admitted ─commit─▶ authorizing ─04 0F: commit, then ack─▶ confirming ─Completion (or T4)─┐
       │                   │ 06 1E / refused / not acked                                    ▼
       │                   └──────────▶ declined · aborted · failed        approved · declined
       │                   │ link lost ─▶ recovery (payment_recovery) ─▶ final or in_doubt
       └─ busy / rejected: no row, no event

The final status commits with its ``payment.completed`` event in one unit of work, and only then
is the POS answered. ``in_doubt`` is asked again whenever its terminal comes back online and on a
timer (payment_recheck); a later answer (or a technician) settles it with ``payment.resolved``.
Payments found unsettled at start-up are recovered before their terminal takes new ones. The
service never starts a second authorization on its own.

A request for a terminal that is offline is ``rejected`` (``terminal-offline``): nothing happened,
so the POS may retry with the same ``request_id``. A link lost mid-payment goes to recovery.
End-of-day runs on the cloud command and daily where ``end_of_day_at`` is set (payment_schedule).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from devices.errors import DeviceError, DeviceRejected, DeviceUnavailable
from devices.zvt_codec import IntermediateStatus, StatusInfo
from gateway.commands import Command, Outcome
from gateway.config import GatewayConfig
from gateway.crashpoints import crash_point
from gateway.db import Database
from gateway.errors import GatewayError, LinkUnavailable, StorageError, StorageFull
from gateway.linkstate import DeviceState, LinkState
from gateway.payment_book import PaymentBook
from gateway.payment_ops import end_of_day, resolve_by_technician, terminal_status
from gateway.payment_recheck import InDoubtRecheck
from gateway.payment_records import (
    EndOfDayData,
    Final,
    PaymentAbortBody,
    PaymentRequestBody,
    Problem,
    Receipt,
    busy_body,
    final_of_transaction,
    result_body,
)
from gateway.payment_recovery import Phase, Run, settle
from gateway.payment_requests import requested_payment
from gateway.payment_schedule import EndOfDaySchedule, SyncedClock
from gateway.payment_terminal import Terminal
from gateway.storebus import Request, RequestError, StoreBus

if TYPE_CHECKING:
    from contextlib import AsyncExitStack

    from gateway.app import Gateway

log = structlog.get_logger(__name__)

DeviceStatusSink = Callable[[str, str, str, str | None], Awaitable[None]]


class PaymentRefused(GatewayError):
    """A 04 0F the gateway will not acknowledge (so the terminal reverses it)."""


class _Stopping(Exception):
    """Raised inside the service's TaskGroup to end what is left at shutdown."""


class PaymentService:
    """The payment flow for every configured ZVT terminal (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        bus: StoreBus,
        config: GatewayConfig,
        device_status: DeviceStatusSink,
        clock: SyncedClock,
    ) -> None:
        self._db = db
        self._bus = bus
        self._config = config
        self._device_status = device_status
        self.book = PaymentBook(db)
        self.terminals = {
            s.id: Terminal(s, on_state=self._on_state, claim=self._claim)
            for s in config.payment_terminals
        }
        self.rechecks = InDoubtRecheck(self.book, self.terminals)
        self.schedules = {
            t.id: EndOfDaySchedule(t, db, clock)
            for t in self.terminals.values()
            if t.settings.end_of_day_at is not None
        }
        self._running: dict[str, Run] = {}
        self._admit = asyncio.Lock()
        self._stop = asyncio.Event()
        self._quiet = asyncio.Event()  # no payment is in an exchange (shutdown waits for that)
        self._quiet.set()
        self._states: asyncio.Queue[tuple[str, DeviceState, str | None]] = asyncio.Queue()
        self._tg: asyncio.TaskGroup | None = None
        self._to_recover: dict[str, list[Run]] = {}
        self._unanswered: dict[str, tuple[str, dict[str, Any]]] = {}  # recovered, not yet sent
        self._answering = asyncio.Lock()  # each recovered result goes out once
        bus.link.state.listeners.append(self._on_bus_state)

    # --- lifecycle ----------------------------------------------------------------------------

    async def load(self) -> None:
        """Read unsettled payments; their terminals stay taken until recovery settled them."""
        loop = asyncio.get_running_loop()
        for stored in await self.book.load_unsettled():
            p = stored.payment
            run = Run(p, loop.create_future(), phase="recovering")
            self._running[p.request_id] = run
            self._to_recover.setdefault(p.device_id, []).append(run)
        for device_id in self._to_recover:
            if device_id in self.terminals:
                self.terminals[device_id].slot.try_take("recovery")
        if self._running:
            log.warning("payments.unsettled_at_start", request_ids=sorted(self._running))

    async def run(self) -> None:
        """Drive the terminals and recover; on stop, let payments in an exchange end (bounded)."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for term in self.terminals.values():
                    tg.create_task(term.driver.run(), name=f"zvt-{term.id}")
                    tg.create_task(term.report_unreachable(), name=f"payments-reachable-{term.id}")
                tg.create_task(self._publish_states(), name="payments-device-status")
                tg.create_task(self.rechecks.run(), name="payments-recheck-in-doubt")
                for device_id, schedule in self.schedules.items():
                    tg.create_task(schedule.run(), name=f"payments-eod-schedule-{device_id}")
                for device_id, runs in self._to_recover.items():
                    owner = self.terminals.get(device_id)
                    tg.create_task(self._recover(owner, runs), name=f"payments-recover-{device_id}")
                self._to_recover = {}
                await self._stop.wait()
                await self._let_payments_end()
                for term in self.terminals.values():
                    await term.driver.aclose()
                raise _Stopping
        except* _Stopping:
            pass
        finally:
            self._tg = None

    def request_stop(self) -> None:
        """Take no new payments; run() returns once those in an exchange ended (≤ T4 + 2 T3)."""
        self._stop.set()

    async def _let_payments_end(self) -> None:
        terms = self.terminals.values()
        bound_s = max((t.settings.t4_s + 2 * t.settings.t3_s for t in terms), default=0)
        try:
            async with asyncio.timeout(bound_s):
                await self._quiet.wait()
        except TimeoutError:
            log.warning("payments.unsettled_at_stop", request_ids=sorted(self._running))

    # --- POS requests -------------------------------------------------------------------------

    async def on_request(self, req: Request, body: PaymentRequestBody) -> Mapping[str, Any]:
        """``payment/request``: run it and answer once its outcome is committed."""
        async with self._admit:
            admitted = await self._admit_request(req, body)
        if not isinstance(admitted, Run):
            return admitted
        run = admitted
        tg = self._require_tg()  # the payment is owned by the service, not by this request
        tg.create_task(self._relay(run), name=f"payment-status-{body.request_id}")
        tg.create_task(self._pay(run), name=f"payment-{body.request_id}")
        answer = await asyncio.shield(run.done)
        await asyncio.shield(run.relayed.wait())  # progress goes out before the result
        return answer

    async def _admit_request(self, req: Request, body: PaymentRequestBody) -> Run | dict[str, Any]:
        """A new run holding its terminal, or the answer (stored result, busy); RequestError."""
        rid = body.request_id
        if self._tg is None or self._stop.is_set():
            raise RequestError("unavailable", "the payment service is not running")
        if (run := self._running.get(rid)) is not None:
            return busy_body(rid, run.payment.amount_minor, run.payment.currency)
        stored = await self.book.get(rid)
        if stored is not None:
            p = stored.payment
            return stored.result or busy_body(rid, p.amount_minor, p.currency)
        settings = self._config.payment_terminal_for(req.owner)
        if settings is None:
            raise RequestError(
                "no-payment-terminal", f"no payment terminal is configured for POS {req.owner}"
            )
        payment = await requested_payment(self.book, self._config, req.owner, settings, body)
        term = self.terminals[settings.id]
        if term.driver.state is not DeviceState.ONLINE:
            raise RequestError("terminal-offline", f"payment terminal {term.id} is offline")
        if not term.slot.try_take(rid):
            return busy_body(rid, payment.amount_minor, payment.currency)
        run = Run(payment, asyncio.get_running_loop().create_future())
        self._running[rid] = run
        self._set_phase(run, "terminal")
        return run

    async def on_abort(self, req: Request, body: PaymentAbortBody) -> Mapping[str, Any]:
        """``payment/abort``: ask the terminal to abort a payment waiting for the card."""
        run = self._running.get(body.request_id)
        if run is None or run.phase != "terminal" or run.payment.till != req.owner:
            return {"request_id": body.request_id, "status": "not_running"}
        try:
            accepted = await self.terminals[run.payment.device_id].driver.abort()
        except DeviceError as err:
            log.info("payment.abort_failed", error=str(err))
            accepted = False
        return {"request_id": body.request_id, "status": "accepted" if accepted else "refused"}

    # --- one payment --------------------------------------------------------------------------

    async def _pay(self, run: Run) -> None:
        """Run one admitted payment to its committed final status, then answer."""
        term = self.terminals[run.payment.device_id]
        structlog.contextvars.bind_contextvars(request_id=run.payment.request_id, device_id=term.id)
        try:
            try:
                await self.book.insert(run.payment)
            except StorageError as err:  # not recorded, nothing sent: rejected, no trace
                run.done.set_result(_not_recorded(run.payment.request_id, err))
                return
            crash_point("payment-after-authorizing")
            final = await self._transact(run, term)
            await self._finish(run, final)
        finally:
            run.statuses.put_nowait(None)
            self._release(run)

    async def _transact(self, run: Run, term: Terminal) -> Final:
        p = run.payment
        gen = term.online_gen

        async def confirm(info: StatusInfo) -> None:
            await self._confirm(run, info)
            crash_point("payment-after-confirming-before-ack")

        async def progress(status: IntermediateStatus) -> None:
            if run.payment.receipt is not None:  # called after the 04 0F was acknowledged
                crash_point("payment-after-ack")
            run.statuses.put_nowait({"request_id": p.request_id, "step": status.step,
                                     "text": status.text})  # fmt: skip

        try:
            if p.kind == "purchase":
                result = await term.driver.authorize(
                    p.amount_minor, p.currency, on_status_info=confirm, on_intermediate=progress
                )
            else:
                result = await term.driver.reversal(
                    p.original_receipt_no or 0, on_status_info=confirm, on_intermediate=progress
                )
        except DeviceUnavailable as err:
            log.warning("payment.link_lost", error=str(err))
            self._set_phase(run, "recovering")
            return await settle(run, term, gen)
        except DeviceRejected as err:
            return Final("failed", err.code, error=Problem("terminal-refused", str(err)))
        except (DeviceError, PaymentRefused, StorageError) as err:
            log.warning("payment.not_acknowledged", error=str(err))  # so the terminal reverses
            return Final("failed", error=Problem("not-acknowledged", str(err)))
        return final_of_transaction(result)

    async def _confirm(self, run: Run, info: StatusInfo) -> None:
        """The commit point: the 04 0F's content is durable before the driver acknowledges it."""
        p = run.payment
        if (
            p.kind == "purchase"
            and info.approved
            and info.amount_minor not in (None, p.amount_minor)
        ):
            raise PaymentRefused(f"the terminal booked {info.amount_minor}, not {p.amount_minor}")
        receipt = Receipt.of(info)
        await self.book.confirm(p, receipt)
        run.payment = dataclasses.replace(p, receipt=receipt)

    async def _finish(self, run: Run, final: Final, *, publish: bool = False) -> None:
        """Commit the final status with its payment.completed event, then answer the POS."""
        p = run.payment
        crash_point("payment-before-final")
        try:
            body = await self.book.complete(p, final)
        except StorageError as err:  # the row stays unsettled: recovered at the next start
            log.error("payment.final_not_committed", error=str(err))
            problem = Problem("storage-error", "the outcome could not be recorded")
            run.done.set_result(result_body(p, Final("in_doubt", error=problem)))
            return
        log.info("payment.completed", status=final.status, result_code=final.result_code)
        run.done.set_result(body)
        if publish:  # nobody waits for it: the POS asked before the gateway restarted
            self._unanswered[p.request_id] = (f"store/v1/pos/{p.till}/payment/result", body)
            await self._answer_recovered()

    def _release(self, run: Run) -> None:
        """Forget a run and free its terminal; a run stopped before its outcome gets in_doubt."""
        if not run.done.done():
            problem = Problem("gateway-stopping", "settled and reported at the next start")
            run.done.set_result(result_body(run.payment, Final("in_doubt", error=problem)))
        rid = run.payment.request_id
        self._running.pop(rid, None)
        self._set_phase(run, "done")
        term = self.terminals.get(run.payment.device_id)
        if term is not None and term.slot.holder == rid:
            term.slot.release()

    def _set_phase(self, run: Run, phase: Phase) -> None:
        run.phase = phase
        if any(r.phase == "terminal" for r in self._running.values()):
            self._quiet.clear()
        else:
            self._quiet.set()

    async def _relay(self, run: Run) -> None:
        """Publish progress in order; a store bus outage drops progress, never the payment."""
        topic = f"store/v1/pos/{run.payment.till}/payment/status"
        try:
            while (status := await run.statuses.get()) is not None:
                await self._publish(topic, status)
        finally:
            run.relayed.set()

    async def _publish(self, topic: str, body: Mapping[str, Any]) -> bool:
        try:
            await self._bus.publish_json(topic, body)
        except LinkUnavailable as err:
            log.info("payment.not_published", topic=topic, error=str(err))
            return False
        return True

    async def _answer_recovered(self) -> None:
        """Send the results of recovered payments (again after the store bus reconnects)."""
        async with self._answering:
            for rid, (topic, body) in list(self._unanswered.items()):
                if not self._bus.link.connected or not await self._publish(topic, body):
                    return
                del self._unanswered[rid]

    def _on_bus_state(self, _name: str, value: str) -> None:
        tg = self._tg
        if value == LinkState.CONNECTED and self._unanswered and tg is not None:
            tg.create_task(self._answer_recovered(), name="payments-answer-recovered")

    # --- recovery and in_doubt ----------------------------------------------------------------

    async def _recover(self, term: Terminal | None, runs: list[Run]) -> None:
        """Settle payments found unsettled at start-up, then free their terminal."""
        try:
            for run in runs:
                structlog.contextvars.bind_contextvars(request_id=run.payment.request_id)
                if term is None:
                    problem = Problem("terminal-not-configured", "its terminal is not configured")
                    final = Final("in_doubt", error=problem)
                else:
                    final = await settle(run, term, after_gen=0)
                await self._finish(run, final, publish=True)
                log.info("payment.recovered", status=final.status)
                self._release(run)
        finally:
            for run in runs:
                self._release(run)
            if term is not None and term.slot.holder == "recovery":
                term.slot.release()

    async def _claim(self, term: Terminal, info: StatusInfo) -> bool:
        """Unsolicited 04 0F: acknowledge it only if it is ours and committed as confirming."""
        candidates = [
            r for r in self._running.values()
            if r.phase == "recovering" and r.payment.device_id == term.id
            and r.payment.receipt is None and info.amount_minor in (None, r.payment.amount_minor)
        ]  # fmt: skip
        if not candidates:
            log.warning("payment.unsolicited_not_ours", device_id=term.id, trace_no=info.trace_no)
            return False
        run = candidates[-1]
        try:
            await self._confirm(run, info)
        except (StorageError, PaymentRefused) as err:
            log.error("payment.unsolicited_not_committed", error=str(err))
            return False
        run.claimed_gen = term.online_gen
        term.poke()
        log.info("payment.claimed", request_id=run.payment.request_id, trace_no=info.trace_no)
        return True

    # --- terminals ----------------------------------------------------------------------------

    def _on_state(self, term: Terminal, state: DeviceState, reason: str | None) -> None:
        self._states.put_nowait((term.id, state, reason))
        if state is DeviceState.ONLINE:
            self.rechecks.came_online(term)

    async def _publish_states(self) -> None:
        """Commit device.status for every terminal state change, in order."""
        while True:
            device_id, state, reason = await self._states.get()
            try:
                await self._device_status(device_id, "payment", state.value, reason)
            except StorageError as err:
                log.error("payment.device_status_not_committed", error=str(err))

    def health(self) -> dict[str, Any]:
        """Health entries of the payment terminals."""
        return {
            "devices": [
                {"device_id": t.id, "kind": "payment", "state": t.driver.state.value}
                for t in self.terminals.values()
            ]
        }

    def _require_tg(self) -> asyncio.TaskGroup:
        if self._tg is None:
            raise RequestError("unavailable", "the payment service is not running")
        return self._tg

    # --- end of day ---------------------------------------------------------------------------

    async def on_end_of_day(self, cmd: Command, data: EndOfDayData) -> Outcome:
        """``payment.end_of_day``: start it in the background; events report each terminal."""
        if data.device_id is not None and data.device_id not in self.terminals:
            return Outcome("rejected", "invalid", "data.device_id: no such payment terminal")
        wanted = [data.device_id] if data.device_id else list(self.terminals)
        tg = self._tg
        if tg is None:
            return Outcome("failed", "unavailable", "the payment service is not running")
        for device_id in wanted:
            tg.create_task(end_of_day(self.terminals[device_id], self._db), name=f"eod-{device_id}")
        return Outcome("ok", data={"device_ids": wanted})

    # --- technician actions -------------------------------------------------------------------

    async def action_status(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """``payment.status``: each terminal's state, and a Status enquiry where it is free."""
        wanted = args.get("device_id")
        out = []
        for term in self.terminals.values():
            if wanted in (None, term.id):
                out.append(await terminal_status(term))
        doubts = self.book.doubtful.values()
        return {
            "ok": True,
            "terminals": out,
            "in_doubt": sorted(d.payment.request_id for d in doubts
                               if wanted in (None, d.payment.device_id)),
            "running": sorted(self._running),
        }  # fmt: skip

    async def action_resolve(self, args: dict[str, Any], uid: int) -> dict[str, Any]:
        """``payment.resolve``: a technician settles an in_doubt payment (approved or failed)."""
        return await resolve_by_technician(self.book, args, uid)


def _not_recorded(request_id: str, err: StorageError) -> dict[str, Any]:
    code = "storage-full" if isinstance(err, StorageFull) else "storage-error"
    message = f"not recorded, {'storage is full' if code == 'storage-full' else 'try again'}"
    return {
        "request_id": request_id,
        "status": "rejected",
        "error": {"code": code, "message": message},
    }


async def install(gw: Gateway, stack: AsyncExitStack) -> None:
    """Card payments: routes, the end-of-day command, technician actions, health, the loop."""
    from gateway.app import Supervised  # noqa: PLC0415 - app imports the registry
    from gateway.commands import CommandSpec  # noqa: PLC0415
    from gateway.storebus import Route  # noqa: PLC0415

    service = PaymentService(gw.db, gw.store_bus, gw.config, gw.device_status, gw.clock)
    for term in service.terminals.values():
        await stack.enter_async_context(term.driver)
    await service.load()
    gw.store_bus.add_route(Route("pos", "payment/request", "request_id", PaymentRequestBody,
                                 service.on_request, "payment/result"))  # fmt: skip
    gw.store_bus.add_route(Route("pos", "payment/abort", "request_id", PaymentAbortBody,
                                 service.on_abort, "payment/abort/result"))  # fmt: skip
    gw.dispatcher.register("payment.end_of_day", CommandSpec(service.on_end_of_day, EndOfDayData))
    gw.actions["payment.status"] = service.action_status
    gw.actions["payment.resolve"] = service.action_resolve
    gw.extra_health.append(service.health)
    gw.components.append(Supervised("payments", service))
