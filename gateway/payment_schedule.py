"""The daily end-of-day of a payment terminal (``end_of_day_at`` in its settings).

A day's run is due from that local time until the end of that local day and happens at most
once: the local date is committed (table ``payment_end_of_day``) once the terminal is ours and
before the End-of-Day command is sent, so neither a restart nor a clock stepped back runs it
twice (a crash right after that commit loses the day's run rather than doubling it). A run
waits for a synced clock (an unsynced one postpones it, logged once per day) and for the
terminal to be free: a payment in an exchange ends first. It reports like the cloud command
(``payment.end_of_day``, with ``error`` when the terminal was offline or failed).

The timer sleeps until the next due moment and recomputes it from the wall clock on every wake;
a sleep never exceeds :data:`MAX_SLEEP_S` (asyncio sleeps on the monotonic clock, so a stepped
wall clock is noticed within that), nor :data:`UNSYNCED_RETRY_S` while the clock is unsynced.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from gateway.db import Database, Work
from gateway.errors import StorageError
from gateway.payment_ops import end_of_day
from gateway.payment_terminal import Terminal

log = structlog.get_logger(__name__)

MAX_SLEEP_S = 3600.0  # bounds how late a wall-clock step can make a run
UNSYNCED_RETRY_S = 60.0  # look again this often while the clock is unsynced (or storage failed)

_LAST = "SELECT last_date FROM payment_end_of_day WHERE device_id = ?"
_MARK = (
    "INSERT INTO payment_end_of_day(device_id, last_date, ran_at) VALUES (?, ?, ?)"
    " ON CONFLICT(device_id) DO UPDATE SET last_date = excluded.last_date,"
    " ran_at = excluded.ran_at"
)


class SyncedClock(Protocol):
    """What the schedule asks of gateway.clock.ClockStatus."""

    def synced(self) -> bool:
        """True when the wall clock can be trusted now."""
        ...


def local_now() -> dt.datetime:
    """Now, aware, in the system's local zone (the wall clock the schedule reads)."""
    return dt.datetime.now().astimezone()


def _local(day: dt.date, at: dt.time) -> dt.datetime:
    """``at`` on ``day`` in the system's local zone (its offset that day: DST included)."""
    return dt.datetime.combine(day, at).astimezone()


class EndOfDaySchedule:
    """One terminal's daily end-of-day (see the module docstring); ``run()`` until cancelled."""

    def __init__(
        self,
        term: Terminal,
        db: Database,
        clock: SyncedClock,
        *,
        now: Callable[[], dt.datetime] | None = None,
    ) -> None:
        at = term.settings.end_of_day_at
        if at is None:
            raise ValueError(f"payment terminal {term.id} has no end_of_day_at")
        self._term = term
        self._db = db
        self._clock = clock
        self._now = now if now is not None else local_now
        self.at = at
        self.last_date: dt.date | None = None  # local date of the last run (committed)
        self._postponed_for: dt.date | None = None
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the clock again now (after a clock change, or in tests)."""
        self._wake.set()

    async def run(self) -> None:
        """Read the last run's date, then run end-of-day whenever it is due, forever."""
        row = await self._db.fetchone(_LAST, (self._term.id,))
        self.last_date = dt.date.fromisoformat(row[0]) if row is not None else None
        while True:
            await self._sleep(await self._step())

    async def _step(self) -> float:
        """Run the day's end-of-day if it is due now; the seconds until the next look."""
        now = self._now().astimezone()
        today = now.date()
        due = _local(today, self.at)
        synced = self._clock.synced()
        if (self.last_date is not None and self.last_date >= today) or now < due:
            nxt = due if now < due else _local(today + dt.timedelta(days=1), self.at)
            wait_s = (nxt - now).total_seconds()
            return wait_s if synced else min(wait_s, UNSYNCED_RETRY_S)
        if not synced:
            if self._postponed_for != today:
                self._postponed_for = today
                log.warning("payment.end_of_day_postponed", device_id=self._term.id,
                            reason="clock-unsynced", due=due.isoformat())  # fmt: skip
            return UNSYNCED_RETRY_S
        try:
            await self._run(today)
        except StorageError as err:
            log.error("payment.end_of_day_not_marked", device_id=self._term.id, error=str(err))
            return UNSYNCED_RETRY_S
        return 0.0

    async def _run(self, today: dt.date) -> None:
        term = self._term
        if term.slot.holder is not None:
            log.info("payment.end_of_day_waits", device_id=term.id, busy_with=term.slot.holder)

        async def mark() -> None:
            statement = (_MARK, (term.id, today.isoformat(), time.time()))
            await self._db.submit(Work(statements=[statement], refusable=False))
            self.last_date = today
            log.info("payment.end_of_day_scheduled_run", device_id=term.id, day=today.isoformat())

        await end_of_day(term, self._db, taken=mark)

    async def _sleep(self, delay_s: float) -> None:
        """Sleep ``delay_s`` (at most MAX_SLEEP_S), or until :meth:`wake`."""
        try:
            async with asyncio.timeout(max(0.0, min(delay_s, MAX_SLEEP_S))):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()
