"""The ZVT link layer: one open connection, framed (serial, ``socket://``) or bare (``tcp://``).

Framed links answer every frame at once with ACK or NAK (bad CRC, broken frame, T1 gap), wait T2
for the ACK of each frame they send and repeat it up to two times (PA00P016 §3). Bare links
split the stream by the APDU length field (§4). Either way, complete APDUs go to ``on_apdu`` and
a dead link is reported once through ``on_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from devices import zvt_codec as codec
from devices.errors import DeviceProtocolError, DeviceTimeout, DeviceUnavailable
from devices.zvt_codec import Apdu


@dataclass(frozen=True, slots=True)
class LinkTiming:
    """T1 (gap between bytes of a frame) and T2 (wait for ACK/NAK)."""

    t1_s: float = 0.2
    t2_s: float = 5.0


@dataclass(slots=True)
class LinkCounts:
    """Running counters; the driver publishes frozen snapshots of them."""

    garbage_bytes: int = 0
    naks_sent: int = 0
    naks_received: int = 0
    retransmissions: int = 0
    protocol_errors: int = 0


class Link:
    """One open connection: framing, ACK/NAK with T1/T2 and retransmission, inbound APDUs."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        framed: bool,
        timing: LinkTiming,
        counts: LinkCounts,
        log: structlog.typing.FilteringBoundLogger,
        on_apdu: Callable[[Apdu], None],
        on_lost: Callable[[], None],
    ) -> None:
        self._reader, self._writer, self.framed, self._timing = reader, writer, framed, timing
        self._counts, self._log, self._on_apdu, self._on_lost = counts, log, on_apdu, on_lost
        self._tx_lock = asyncio.Lock()
        self._ack: asyncio.Future[bool] | None = None
        self.error: DeviceUnavailable | None = None

    def fail(self, err: DeviceUnavailable) -> None:
        """Mark the link dead (the first error wins) and wake everyone waiting on it."""
        if self.error is not None:
            return
        self.error = err
        if self._ack is not None and not self._ack.done():
            self._ack.set_exception(err)
        self._on_lost()

    async def _write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (OSError, RuntimeError) as err:
            lost = DeviceUnavailable(f"write failed: {err}")
            self.fail(lost)
            raise lost from err

    async def send(self, apdu: Apdu) -> None:
        """Send one APDU; a framed link waits T2 for ACK and repeats the frame up to 2 times."""
        if not self.framed:
            await self._write(apdu.encode())
            return
        frame = codec.encode_frame(apdu.encode())
        async with self._tx_lock:
            last_was_nak = False
            for attempt in range(3):
                if attempt:
                    self._counts.retransmissions += 1
                self._ack = asyncio.get_running_loop().create_future()
                try:
                    await self._write(frame)
                    async with asyncio.timeout(self._timing.t2_s):
                        if await self._ack:
                            return
                    last_was_nak = True
                    self._counts.naks_received += 1
                except TimeoutError:
                    last_was_nak = False
                finally:
                    self._ack = None
            err_type = DeviceUnavailable if last_was_nak else DeviceTimeout
            err = err_type(f"frame {apdu} not acknowledged after 3 attempts")
            self.fail(err)
            raise err

    def send_nowait(self, apdu: Apdu) -> None:
        """Write without waiting for anything (Log-off while being cancelled)."""
        data = codec.encode_frame(apdu.encode()) if self.framed else apdu.encode()
        if self.error is None:
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write(data)

    async def pump(self) -> None:
        """Read until the link dies: ACK/NAK frames at once, hand APDUs on, resync on garbage."""
        decoder = codec.FrameDecoder() if self.framed else None
        splitter = codec.ApduSplitter()
        t1_s = self._timing.t1_s
        try:
            while True:
                gap = t1_s if decoder is not None and decoder.in_frame else None
                try:
                    async with asyncio.timeout(gap):
                        data = await self._reader.read(4096)
                except TimeoutError:
                    if decoder is not None and decoder.expire() is not None:
                        await self._nak("T1 gap inside a frame")
                    continue
                if not data:
                    raise DeviceUnavailable("link closed by the terminal")
                if decoder is None:
                    for apdu in splitter.feed(data):
                        self._on_apdu(apdu)
                else:
                    await self._feed_framed(decoder, data)
        except (OSError, RuntimeError) as err:
            lost = DeviceUnavailable(f"read failed: {err}")
            self.fail(lost)
            raise lost from err
        except DeviceUnavailable as err:
            self.fail(err)
            raise

    async def _feed_framed(self, decoder: codec.FrameDecoder, data: bytes) -> None:
        before = decoder.discarded
        for event in decoder.feed(data):
            if isinstance(event, codec.Control):
                if self._ack is not None and not self._ack.done():
                    self._ack.set_result(event is codec.Control.ACK)
            elif isinstance(event, codec.FrameBad):
                await self._nak(event.reason)
            else:
                await self._write(bytes([codec.ACK]))
                try:
                    apdu = codec.decode_apdu(event.apdu)
                except DeviceProtocolError as err:
                    self._counts.protocol_errors += 1
                    self._log.warning("zvt.protocol_error", error=str(err))
                else:
                    self._on_apdu(apdu)
        if decoder.discarded > before:
            self._counts.garbage_bytes += decoder.discarded - before
            self._log.info("zvt.garbage_discarded", bytes=decoder.discarded - before)

    async def _nak(self, reason: str) -> None:
        self._counts.naks_sent += 1
        self._log.info("zvt.frame_rejected", reason=reason)
        await self._write(bytes([codec.NAK]))
