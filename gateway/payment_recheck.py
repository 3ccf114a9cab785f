"""Asking terminals again about their in_doubt payments (devices.md "Recovery").

A terminal is asked when it comes back online and, while it is online, every
:data:`RECHECK_IN_DOUBT_S`. One timer task owns every ask (``run()``, in the payment service's
TaskGroup); an ask takes the terminal's slot, so it waits for a payment in an exchange, and at
most one ask per terminal runs at a time. The timer asks one payment at most
:data:`RECHECK_TIMER_MAX` times; a reconnect still asks it after that. A later answer settles the
payment with ``payment.resolved``; an answer that can never place it leaves it to a technician.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import structlog

from gateway.errors import StorageError
from gateway.linkstate import DeviceState
from gateway.payment_book import PaymentBook
from gateway.payment_recovery import repeat
from gateway.payment_terminal import Terminal

log = structlog.get_logger(__name__)

RECHECK_IN_DOUBT_S = 300.0
RECHECK_TIMER_MAX = 288  # a day of timer asks at the default interval, per payment


class InDoubtRecheck:
    """The in_doubt rechecks of every terminal (see the module docstring)."""

    def __init__(
        self,
        book: PaymentBook,
        terminals: Mapping[str, Terminal],
        *,
        interval_s: float | None = None,
        timer_max: int | None = None,
    ) -> None:
        self._book = book
        self._terminals = terminals
        self.interval_s = RECHECK_IN_DOUBT_S if interval_s is None else interval_s
        self._timer_max = RECHECK_TIMER_MAX if timer_max is None else timer_max
        self._timer_asks: dict[str, int] = {}
        self._came_online: set[str] = set()
        self._wake = asyncio.Event()

    def came_online(self, term: Terminal) -> None:
        """Ask this terminal soon: it registered again."""
        self._came_online.add(term.id)
        self._wake.set()

    async def run(self) -> None:
        """The timer: a round over every terminal each interval, one for each that came online."""
        loop = asyncio.get_running_loop()
        next_round = loop.time() + self.interval_s
        async with asyncio.TaskGroup() as tg:
            while True:
                try:
                    async with asyncio.timeout(max(0.0, next_round - loop.time())):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
                timed = loop.time() >= next_round
                if timed:
                    next_round = loop.time() + self.interval_s
                    self._forget_settled()
                wanted = set(self._terminals) if timed else self._came_online
                self._came_online = set()
                for term in (self._terminals[i] for i in sorted(wanted)):
                    if self._wanted(term, timed=timed):
                        term.recheck_pending = True
                        tg.create_task(self._recheck(term, timed=timed),
                                       name=f"payments-recheck-{term.id}")  # fmt: skip

    def _forget_settled(self) -> None:
        doubtful = self._book.doubtful
        self._timer_asks = {r: n for r, n in self._timer_asks.items() if r in doubtful}

    def _askable(self, request_id: str, *, timed: bool) -> bool:
        return not timed or self._timer_asks.get(request_id, 0) < self._timer_max

    def _wanted(self, term: Terminal, *, timed: bool) -> bool:
        if term.recheck_pending or term.driver.state is not DeviceState.ONLINE:
            return False
        return any(
            d.recheck and d.payment.device_id == term.id
            and self._askable(d.payment.request_id, timed=timed)
            for d in self._book.doubtful.values()
        )  # fmt: skip

    async def _recheck(self, term: Terminal, *, timed: bool) -> None:
        """Ask ``term`` about each of its in_doubt payments that asking may still settle."""
        await term.slot.take("recheck")
        try:
            for doubt in list(self._book.doubtful.values()):
                rid = doubt.payment.request_id
                if doubt.payment.device_id != term.id or not doubt.recheck:
                    continue
                if not self._askable(rid, timed=timed):
                    continue
                if term.driver.state is not DeviceState.ONLINE:
                    break
                if timed:
                    self._count_timer_ask(rid)
                await self._ask(term, rid)
        finally:
            term.recheck_pending = False
            term.slot.release()

    def _count_timer_ask(self, rid: str) -> None:
        asks = self._timer_asks[rid] = self._timer_asks.get(rid, 0) + 1
        if asks == self._timer_max:
            log.warning("payment.recheck_timer_exhausted", request_id=rid, asks=asks)

    async def _ask(self, term: Terminal, rid: str) -> None:
        doubt = self._book.doubtful.get(rid)
        if doubt is None:  # settled meanwhile (a technician)
            return
        final = await repeat(doubt.payment, term)
        try:
            if final.status != "in_doubt":
                await self._book.resolve(rid, final, "terminal")
                self._timer_asks.pop(rid, None)
                log.info("payment.resolved", request_id=rid, status=final.status)
            elif not final.recheck:
                await self._book.stop_rechecking(rid)
                log.warning("payment.needs_technician", request_id=rid)
        except StorageError as err:
            log.error("payment.recheck_not_committed", request_id=rid, error=str(err))
