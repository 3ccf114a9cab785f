"""Modbus RTU for locker boards: CRC, request builders, an incremental decoder and a bus.

Framing never relies on the 3.5-character silence: over ``socket://`` (ser2net, NPort) the gaps
are lost, so a frame's length is derived from its function code and its CRC decides whether a
candidate is real. Bytes that form no valid frame are discarded and counted; the decoder
resynchronises on the next valid frame.

Errors (see ``gateway.errors`` for the whole tree): a missing or lost link raises
``DeviceUnavailable``; no valid answer after the retries raises ``DeviceTimeout``; an exception
reply raises ``DeviceRejected`` with the Modbus exception code; a reply that cannot be read
raises ``DeviceProtocolError``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import NoReturn, Self

import structlog

from devices.errors import DeviceProtocolError, DeviceRejected, DeviceTimeout, DeviceUnavailable
from devices.transport import SerialParams, open_endpoint

READ_COILS = 0x01
READ_DISCRETE_INPUTS = 0x02
WRITE_SINGLE_COIL = 0x05
EXCEPTION_FLAG = 0x80

PULSE_BASE_ADDRESS = 0x0200  # write N to 0x0200 + ch: the board energises ch for N x 100 ms
ALL_RELAYS_ADDRESS = 0x00FF  # write 00 00 here: every relay off

MAX_UNIT = 247
_MAX_FRAME = 256  # RTU ADU limit


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/MODBUS of ``data`` (reflected poly 0xA001, init 0xFFFF); "123456789" → 0x4B37."""
    crc = 0xFFFF
    for byte in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ byte) & 0xFF]
    return crc


def _crc_ok(adu: bytes | bytearray | memoryview) -> bool:
    return crc16(adu[:-2]) == adu[-2] | (adu[-1] << 8)


@dataclass(frozen=True, slots=True)
class Frame:
    """One Modbus RTU frame without its CRC."""

    unit: int
    function: int
    data: bytes

    @property
    def is_exception(self) -> bool:
        """True for an exception reply (function code with bit 7 set)."""
        return bool(self.function & EXCEPTION_FLAG)

    @property
    def exception_code(self) -> int:
        """The Modbus exception code of an exception reply."""
        if not self.is_exception or len(self.data) != 1:
            raise DeviceProtocolError(f"not an exception reply: {self.encode().hex(' ')}")
        return self.data[0]

    def encode(self) -> bytes:
        """The frame on the wire: unit, function, data, CRC low byte first."""
        return encode(self.unit, self.function, self.data)


def encode(unit: int, function: int, data: bytes) -> bytes:
    """A complete ADU for ``unit``/``function``/``data`` with its CRC appended."""
    if not 0 <= unit <= MAX_UNIT:
        raise ValueError(f"unit {unit} outside 0..{MAX_UNIT}")
    if not 1 <= function <= 0xFF:
        raise ValueError(f"function {function} outside 1..255")
    body = bytes((unit, function)) + data
    return body + crc16(body).to_bytes(2, "little")


def _u16(*values: int) -> bytes:
    return b"".join(v.to_bytes(2, "big") for v in values)


def read_discrete_inputs(unit: int, start: int = 0, count: int = 8) -> bytes:
    """Request 02: read ``count`` discrete inputs (door switches) from ``start``."""
    return encode(unit, READ_DISCRETE_INPUTS, _u16(start, count))


def read_coils(unit: int, start: int = 0, count: int = 8) -> bytes:
    """Request 01: read ``count`` coils (relay states) from ``start``."""
    return encode(unit, READ_COILS, _u16(start, count))


def write_single_coil(unit: int, address: int, value: int) -> bytes:
    """Request 05: write the raw 16-bit ``value`` to coil ``address``."""
    if not 0 <= address <= 0xFFFF or not 0 <= value <= 0xFFFF:
        raise ValueError("address and value must fit 16 bits")
    return encode(unit, WRITE_SINGLE_COIL, _u16(address, value))


def pulse(unit: int, channel: int, tenths: int) -> bytes:
    """Request 05 for a board-timed pulse: relay ``channel`` on for ``tenths`` x 100 ms."""
    if not 0 <= channel <= 7:
        raise ValueError(f"channel {channel} outside 0..7")
    if not 1 <= tenths <= 0xFF:
        raise ValueError(f"pulse of {tenths} x 100 ms outside 1..255")
    return write_single_coil(unit, PULSE_BASE_ADDRESS + channel, tenths)


def all_relays_off(unit: int) -> bytes:
    """Request 05 that releases every relay of the board."""
    return write_single_coil(unit, ALL_RELAYS_ADDRESS, 0x0000)


def decode_bits(frame: Frame, count: int) -> tuple[bool, ...]:
    """The first ``count`` bits of an 01/02 reply, channel 0 = bit 0 of the first byte."""
    if frame.function not in (READ_COILS, READ_DISCRETE_INPUTS):
        raise DeviceProtocolError(f"function 0x{frame.function:02X} carries no bits")
    nbytes = (count + 7) // 8
    if len(frame.data) != 1 + nbytes or frame.data[0] != nbytes:
        raise DeviceProtocolError(f"expected {nbytes} data bytes, got {frame.data.hex(' ')}")
    return tuple(bool(frame.data[1 + i // 8] >> (i % 8) & 1) for i in range(count))


# A length rule looks at the bytes from a candidate frame start and answers the full ADU length,
# 0 when more bytes are needed to tell, or None when no frame can start here.
LengthRule = Callable[[bytes | bytearray | memoryview], int | None]


_COUNTED_REPLIES = frozenset({0x01, 0x02, 0x03, 0x04})  # unit fn count data... crc
_FIXED_REPLIES = {0x05: 8, 0x06: 8, 0x0F: 8, 0x10: 8}


def reply_length(buf: bytes | bytearray | memoryview) -> int | None:
    """Length rule for replies from a slave (what the gateway reads)."""
    if len(buf) < 2:
        return 0 if not buf or 1 <= buf[0] <= MAX_UNIT else None
    unit, function = buf[0], buf[1]
    if not 1 <= unit <= MAX_UNIT:
        return None
    if function & EXCEPTION_FLAG:
        return 5 if function != EXCEPTION_FLAG else None
    if function in _COUNTED_REPLIES:
        if len(buf) < 3:
            return 0
        return 5 + buf[2] if buf[2] else None
    return _FIXED_REPLIES.get(function)


def request_length(buf: bytes | bytearray | memoryview) -> int | None:
    """Length rule for requests from a master (what a board, or the simulator, reads)."""
    if len(buf) < 2:
        return 0 if not buf or buf[0] <= MAX_UNIT else None
    if buf[0] > MAX_UNIT or buf[1] == 0 or buf[1] & EXCEPTION_FLAG:
        return None
    if buf[1] in (0x0F, 0x10):
        if len(buf) < 7:
            return 0
        return 9 + buf[6]
    return 8  # 01..06 and, as a best guess for unknown functions, the common fixed size


class FrameDecoder:
    """Incremental splitter of a byte stream into CRC-valid frames; never raises on input."""

    def __init__(self, length_of: LengthRule = reply_length) -> None:
        self._length_of = length_of
        self._buf = bytearray()
        self.garbage_bytes = 0
        self.crc_errors = 0

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buf)

    def clear(self) -> int:
        """Drop the held-back bytes (counted as garbage); returns how many."""
        dropped = len(self._buf)
        self.garbage_bytes += dropped
        self._buf.clear()
        return dropped

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; returns every frame completed by them, in order."""
        self._buf += data
        frames: list[Frame] = []
        while (frame := self._next()) is not None:
            frames.append(frame)
        return frames

    def _next(self) -> Frame | None:
        buf = self._buf
        start = 0
        while start < len(buf):
            length = self._length_of(memoryview(buf)[start:])
            if length is None or length > _MAX_FRAME:
                start += 1
                continue
            if length == 0 or start + length > len(buf):
                later = self._complete_after(start + 1)
                if later is None:
                    break  # wait for more bytes
                start = later
                continue
            if _crc_ok(memoryview(buf)[start : start + length]):
                return self._take(start, length)
            self.crc_errors += 1
            start += 1
        self._discard(start)
        return None

    def _complete_after(self, offset: int) -> int | None:
        # A garbage byte can look like the start of a long frame; a complete valid frame
        # further on proves it was not one.
        view = memoryview(self._buf)
        for i in range(offset, len(view)):
            length = self._length_of(view[i:])
            if length and i + length <= len(view) and _crc_ok(view[i : i + length]):
                return i
        return None

    def _take(self, start: int, length: int) -> Frame:
        self._discard(start)
        adu = bytes(self._buf[:length])
        del self._buf[:length]
        return Frame(adu[0], adu[1], adu[2:-2])

    def _discard(self, count: int) -> None:
        if count:
            self.garbage_bytes += count
            del self._buf[:count]


@dataclass(frozen=True, slots=True)
class BusCounters:
    """Snapshot of a bus's error counters since it was created."""

    garbage_bytes: int = 0
    crc_errors: int = 0
    timeouts: int = 0
    exceptions: int = 0
    unexpected_frames: int = 0


def inter_frame_gap_s(baudrate: int) -> float:
    """The 3.5-character silence between frames (fixed 1.75 ms above 19200 baud)."""
    return 3.5 * 11 / baudrate if baudrate <= 19200 else 0.00175


def _answers(request: bytes, frame: Frame) -> bool:
    """True when ``frame`` is the reply (or the exception reply) to ``request``."""
    if frame.unit != request[0]:
        return False
    if frame.function == request[1] | EXCEPTION_FLAG:
        return len(frame.data) == 1
    if frame.function != request[1]:
        return False
    if frame.function in (READ_COILS, READ_DISCRETE_INPUTS):
        count = int.from_bytes(request[4:6], "big")
        return frame.data[:1] == bytes(((count + 7) // 8,))
    if frame.function == WRITE_SINGLE_COIL:
        return frame.encode() == request
    return True


_Link = tuple[asyncio.StreamReader, asyncio.StreamWriter, contextlib.AsyncExitStack]


class ModbusRtuBus:
    """One RS-485 bus behind one endpoint; requests strictly one at a time, gaps respected.

    The link opens on first use and reopens after a loss; failures raise DeviceUnavailable
    so the caller can back off.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        baudrate: int = 9600,
        response_timeout_s: float = 0.3,
        retries: int = 2,
        connect_timeout_s: float = 2.0,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._params = SerialParams(baudrate=baudrate)
        self._gap_s = inter_frame_gap_s(baudrate)
        self._response_timeout_s = response_timeout_s
        self._retries = retries
        self._connect_timeout_s = connect_timeout_s
        self._log = log or structlog.get_logger(__name__).bind(endpoint=endpoint)
        self._lock = asyncio.Lock()
        self._decoder = FrameDecoder(reply_length)
        self._link: _Link | None = None
        self._quiet_since = 0.0
        self._timeouts = 0
        self._exceptions = 0
        self._unexpected = 0

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    @property
    def connected(self) -> bool:
        """True while the link is open."""
        return self._link is not None

    @property
    def counters(self) -> BusCounters:
        """Error counters so far."""
        return BusCounters(
            garbage_bytes=self._decoder.garbage_bytes,
            crc_errors=self._decoder.crc_errors,
            timeouts=self._timeouts,
            exceptions=self._exceptions,
            unexpected_frames=self._unexpected,
        )

    async def disconnect(self) -> None:
        """Close the link (the next request reopens it)."""
        link, self._link = self._link, None
        if link is not None:
            await link[2].aclose()

    async def connect(self) -> None:
        """Open the link now if it is not open; raises DeviceUnavailable."""
        async with self._lock:
            await self._ensure_link()

    async def read_discrete_inputs(self, unit: int, count: int = 8) -> tuple[bool, ...]:
        """Function 02 from address 0: the door switch inputs."""
        return decode_bits(await self.transact(read_discrete_inputs(unit, 0, count)), count)

    async def read_coils(self, unit: int, count: int = 8) -> tuple[bool, ...]:
        """Function 01 from address 0: the relay states."""
        return decode_bits(await self.transact(read_coils(unit, 0, count)), count)

    async def pulse(self, unit: int, channel: int, tenths: int) -> None:
        """Board-timed pulse of one relay for ``tenths`` x 100 ms; sent once, never retried.

        A lost reply does not mean a lost pulse: resending would open the lock again without its
        audit record. DeviceTimeout here means "outcome unknown"; the caller decides (the door).
        """
        await self.transact(pulse(unit, channel, tenths), retries=0)

    async def all_relays_off(self, unit: int) -> None:
        """Release every relay of one board."""
        await self.transact(all_relays_off(unit))

    async def transact(self, request: bytes, *, retries: int | None = None) -> Frame:
        """Send one complete request ADU and return its reply frame (never an exception reply)."""
        if len(request) < 4 or not 1 <= request[0] <= MAX_UNIT:
            raise ValueError("request must be a complete ADU for unit 1..247")
        attempts = 1 + (self._retries if retries is None else retries)
        async with self._lock:
            for _ in range(attempts):
                reply = await self._attempt(request)
                if reply is not None:
                    return self._checked(request, reply)
        raise DeviceTimeout(
            f"unit {request[0]}: no answer to function 0x{request[1]:02X} after {attempts} tries"
        )

    def _checked(self, request: bytes, reply: Frame) -> Frame:
        if reply.is_exception:
            self._exceptions += 1
            raise DeviceRejected(
                f"unit {reply.unit} refused function 0x{request[1]:02X}", code=reply.data[0]
            )
        return reply

    async def _attempt(self, request: bytes) -> Frame | None:
        reader, writer = await self._ensure_link()
        loop = asyncio.get_running_loop()
        wait_s = self._quiet_since + self._gap_s - loop.time()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        try:
            writer.write(request)
            await writer.drain()
        except (OSError, ConnectionError) as err:
            await self._lost(err)
        self._quiet_since = loop.time()
        try:
            async with asyncio.timeout(self._response_timeout_s):
                return await self._read_reply(reader, request)
        except TimeoutError:
            self._timeouts += 1
            return None
        finally:
            self._quiet_since = loop.time()

    async def _read_reply(self, reader: asyncio.StreamReader, request: bytes) -> Frame:
        while True:
            try:
                chunk = await reader.read(_MAX_FRAME)
            except (OSError, ConnectionError) as err:
                await self._lost(err)
            if not chunk:
                await self._lost(EOFError("end of stream"))
            garbage_before = self._decoder.garbage_bytes
            frames = self._decoder.feed(chunk)
            if self._decoder.garbage_bytes != garbage_before:
                self._log.info(
                    "modbus garbage discarded",
                    bytes=self._decoder.garbage_bytes - garbage_before,
                    crc_errors=self._decoder.crc_errors,
                )
            for frame in frames:
                if _answers(request, frame):
                    return frame
                self._unexpected += 1
                self._log.debug("modbus frame ignored", frame=frame.encode().hex(" "))

    async def _ensure_link(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._link is None:
            stack = contextlib.AsyncExitStack()
            reader, writer = await stack.enter_async_context(
                open_endpoint(
                    self.endpoint, self._params, connect_timeout_s=self._connect_timeout_s
                )
            )
            self._link = (reader, writer, stack)
            self._decoder.clear()
        return self._link[0], self._link[1]

    async def _lost(self, err: BaseException) -> NoReturn:
        await self.disconnect()
        raise DeviceUnavailable(f"{self.endpoint}: link lost: {err}") from err
