"""Drain the outbox to the cloud: stream from SQLite, batch, publish QoS 1 in a window.

The drainer never holds the backlog in memory: it reads ``read_ahead`` committed events at a
time, cuts them into messages of at most ``max_batch`` consecutive envelopes and 128 KiB, and keeps
up to ``max_inflight`` messages awaiting their PUBACK. A PUBACK moves the *sent* watermark (written
in batches, once a second); only the backend's ``ack`` lets an event go. After every (re)connect,
after ``resend_after_s`` without ack progress, and on ``events.replay`` the cursor moves back and
the held events are sent again — the same stored bytes every time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import structlog

from gateway.crashpoints import crash_point
from gateway.outbox import Outbox

log = structlog.get_logger(__name__)

MAX_MESSAGE_BYTES = 128 * 1024
_HEAD = b'{"events":['
_TAIL = b"]}"

Publish = Callable[[bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Batch:
    """One MQTT message worth of consecutive events."""

    first_seq: int
    last_seq: int
    payload: bytes


def make_batches(rows: Sequence[tuple[int, str]], max_batch: int) -> Iterator[Batch]:
    """Cut consecutive (seq, body) rows into messages of ≤ max_batch envelopes and ≤ 128 KiB."""
    limit = MAX_MESSAGE_BYTES - len(_HEAD) - len(_TAIL)
    start = 0
    while start < len(rows):
        chunk = rows[start : start + max_batch]
        body = ",".join(r[1] for r in chunk).encode()
        if len(body) <= limit:  # the common case: one join, one encode per message
            yield Batch(chunk[0][0], chunk[-1][0], _HEAD + body + _TAIL)
            start += len(chunk)
            continue
        parts: list[bytes] = []
        size = 0
        for _seq, text in chunk:  # too big: take as many envelopes as fit (at least one)
            data = text.encode()
            if parts and size + len(data) + 1 > limit:
                break
            size += len(data) + (1 if parts else 0)
            parts.append(data)
        yield Batch(chunk[0][0], chunk[0][0] + len(parts) - 1, _HEAD + b",".join(parts) + _TAIL)
        start += len(parts)


class _RateLimiter:
    """At most ``rate`` acquisitions per second (a token bucket of one second's depth)."""

    def __init__(self, rate: float) -> None:
        self._interval_s = 1.0 / rate
        self._next = 0.0

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._next <= now:
            self._next = max(self._next + self._interval_s, now - 1.0 + self._interval_s)
            return
        delay = self._next - now
        self._next += self._interval_s
        await asyncio.sleep(delay)


class Drainer:
    """Streams held events to the cloud within one connected session (see module docstring)."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        max_inflight: int = 100,
        max_batch: int = 100,
        resend_after_s: float = 60.0,
        max_publish_rate: float | None = None,
        read_ahead: int = 2000,
        persist_every_s: float = 1.0,
    ) -> None:
        self.outbox = outbox
        self.max_inflight = max_inflight
        self.max_batch = max_batch
        self.resend_after_s = resend_after_s
        self.read_ahead = max(read_ahead, max_batch)
        self.persist_every_s = persist_every_s
        self._rate = _RateLimiter(max_publish_rate) if max_publish_rate else None
        self._wake = asyncio.Event()
        self._ack_progress = asyncio.Event()
        self._rewind_to: int | None = None
        self.messages_sent = 0
        self.resends = 0

    def notify_committed(self, _last_seq: int) -> None:
        """Commit listener: new events are ready."""
        self._wake.set()

    def notify_acked(self) -> None:
        """The backend's ack moved forward."""
        self._ack_progress.set()

    def replay(self, from_seq: int) -> None:
        """Send everything held with seq ≥ from_seq again (``events.replay``)."""
        self._rewind(max(1, from_seq), reason="replay")

    def _rewind(self, seq: int, *, reason: str) -> None:
        self._rewind_to = seq if self._rewind_to is None else min(self._rewind_to, seq)
        self.resends += 1
        log.info("resending held events", from_seq=seq, reason=reason)
        self._wake.set()

    async def run(self, publish: Publish) -> None:
        """Drain until cancelled (the session ends); a publish failure ends the session."""
        cursor = self.outbox.acked_through + 1
        window = asyncio.Semaphore(self.max_inflight)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._resend_watch(), name="drain-resend")
            tg.create_task(self._persist_loop(), name="drain-persist")
            prefetch: asyncio.Task[list[tuple[int, str]]] | None = None
            while True:
                if self._rewind_to is not None:
                    # Only ever back: a replay from beyond the cursor must not skip anything.
                    cursor, self._rewind_to = min(cursor, self._rewind_to), None
                    if prefetch is not None:
                        prefetch.cancel()
                        prefetch = None
                self._wake.clear()
                if prefetch is not None:
                    rows = await prefetch
                    prefetch = None
                else:
                    rows = await self.outbox.fetch_from(cursor, self.read_ahead)
                if not rows:
                    await self._wake.wait()
                    continue
                if len(rows) == self.read_ahead:  # a backlog: read the next page while sending
                    prefetch = tg.create_task(
                        self.outbox.fetch_from(rows[-1][0] + 1, self.read_ahead)
                    )
                cursor = rows[0][0]
                for batch in make_batches(rows, self.max_batch):
                    if self._rewind_to is not None:
                        break
                    await window.acquire()
                    if self._rate is not None:
                        await self._rate.acquire()
                    tg.create_task(self._send(publish, batch, window))
                    cursor = batch.last_seq + 1

    async def _send(self, publish: Publish, batch: Batch, window: asyncio.Semaphore) -> None:
        try:
            await publish(batch.payload)
        finally:
            window.release()
        crash_point("after-publish")  # PUBACKed, not yet marked sent
        self.messages_sent += 1
        self.outbox.mark_sent(batch.last_seq)

    async def _resend_watch(self) -> None:
        while True:
            self._ack_progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resend_after_s):
                    await self._ack_progress.wait()
                continue
            if self.outbox.sent_through > self.outbox.acked_through:
                self._rewind(self.outbox.acked_through + 1, reason="no ack within resend_after_s")

    async def _persist_loop(self) -> None:
        """Write the watermarks about once a second (the app writes them once more at stop;
        a link drop loses at most a second of them, which only resends acked events)."""
        while True:
            await asyncio.sleep(self.persist_every_s)
            await self.outbox.persist()
