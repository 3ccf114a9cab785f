"""One backoff policy: capped, jittered exponential, reset on success, wakeable."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays ``initial_s * factor**n`` (capped at ``max_s``) with full jitter in [d/2, d].

    ``wait()`` sleeps the next delay but returns early when ``wake()`` is called
    (a zeroconf sighting, a re-plugged adapter, a technician's "try now").
    """

    initial_s: float = 0.5
    max_s: float = 60.0
    factor: float = 2.0
    rand: Callable[[], float] = random.random
    _attempt: int = 0
    _woken: asyncio.Event = field(default_factory=asyncio.Event)

    def next_delay_s(self) -> float:
        """The delay before the next attempt; advances the attempt counter."""
        base = min(self.max_s, self.initial_s * self.factor**self._attempt)
        self._attempt = min(self._attempt + 1, 64)
        return base / 2 + base / 2 * self.rand()

    def reset(self) -> None:
        """Call after a success: the next failure starts from ``initial_s`` again."""
        self._attempt = 0

    def exhaust(self) -> None:
        """Make the next waits the longest (a fatal-looking failure: retry rarely)."""
        self._attempt = 64

    def wake(self) -> None:
        """End the current (or next) wait at once."""
        self._woken.set()

    @property
    def attempts(self) -> int:
        """Failures since the last reset."""
        return self._attempt

    async def wait(self) -> float:
        """Sleep the next delay (or until woken); returns the delay that was chosen."""
        delay = self.next_delay_s()
        try:
            async with asyncio.timeout(delay):
                await self._woken.wait()
        except TimeoutError:
            pass
        self._woken.clear()
        return delay
