"""One payment terminal as the payment service sees it: the ZVT driver, who uses it, and whether
it has answered normally since a given moment ("idle" in devices.md Recovery).

``online_gen`` counts the driver's transitions to online (each follows a successful
Registration); ``wait_until`` wakes on every state change and every :meth:`poke`, so waiting for
"online again after generation N" or "our 04 0F was claimed" needs no polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from devices.zvt import ZvtSettings, ZvtTerminal
from devices.zvt_codec import StatusInfo
from gateway.backoff import Backoff
from gateway.linkstate import DeviceState

StateSink = Callable[["Terminal", DeviceState, str | None], None]
ClaimSink = Callable[["Terminal", StatusInfo], Awaitable[bool]]


class Slot:
    """Who uses a terminal now (a request_id, ``recovery``, ``end_of_day``, ...); one at a time."""

    def __init__(self) -> None:
        self.holder: str | None = None
        self._free = asyncio.Event()
        self._free.set()

    def try_take(self, holder: str) -> bool:
        """Take the terminal if it is free; never waits."""
        if self.holder is not None:
            return False
        self.holder = holder
        self._free.clear()
        return True

    async def take(self, holder: str) -> None:
        """Take the terminal, waiting until it is free."""
        while not self.try_take(holder):
            await self._free.wait()

    def release(self) -> None:
        """Free the terminal."""
        self.holder = None
        self._free.set()


class Terminal:
    """A ZVT driver with its slot and online generation (see the module docstring)."""

    def __init__(
        self,
        settings: ZvtSettings,
        *,
        on_state: StateSink,
        claim: ClaimSink,
        backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self.id = settings.id
        self.slot = Slot()
        self.online_gen = 0
        self.recheck_pending = False
        self._on_state = on_state
        self._claim = claim
        self._changed = asyncio.Event()
        self.driver = ZvtTerminal(
            settings,
            on_state=self._state_changed,
            on_unsolicited_status_info=self._unsolicited,
            backoff=backoff or Backoff(initial_s=0.5, max_s=30.0),
        )

    def online_after(self, gen: int) -> bool:
        """Online now, and registered again since generation ``gen``."""
        return self.driver.state is DeviceState.ONLINE and self.online_gen > gen

    def poke(self) -> None:
        """Wake everyone in :meth:`wait_until` to re-check their condition."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``condition()`` holds (re-checked on every change); False after timeout_s."""
        try:
            async with asyncio.timeout(timeout_s):
                while not condition():
                    await self._changed.wait()
        except TimeoutError:
            return condition()
        return True

    async def report_unreachable(self, grace_s: float | None = None) -> None:
        """Report ``offline`` once if the terminal has not answered since start-up in ``grace_s``.

        The driver starts offline and reports changes only, so a terminal that never answers
        would never be reported. Default grace: one connect and Registration attempt.
        """
        s = self.settings
        grace = s.connect_timeout_s + 3 * s.t2_s + s.t3_s if grace_s is None else grace_s
        answered = await self.wait_until(
            lambda: self.online_gen > 0 or self.driver.state is not DeviceState.OFFLINE, grace
        )
        if not answered:
            self._on_state(self, DeviceState.OFFLINE, f"no answer within {grace:g} s of start-up")

    def _state_changed(self, state: DeviceState, reason: str | None) -> None:
        if state is DeviceState.ONLINE:
            self.online_gen += 1
        self._on_state(self, state, reason)
        self.poke()

    async def _unsolicited(self, info: StatusInfo) -> bool:
        return await self._claim(self, info)
