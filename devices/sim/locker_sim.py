"""Simulated Modbus RTU locker boards (8 relays, 8 door inputs each) on a pty or a TCP port.

Speaks the real bytes, CRC included, and the board profile of devices.md: function 02 reads the
door inputs, 01 the relays, 05 at ``0x0200 + ch`` is a board-timed pulse, 05 at ``0x00FF`` with
``00 00`` releases every relay. Anything else gets a Modbus exception reply. A pulse energises
the relay for N x 100 ms and the door pops open at once unless the channel is jammed; doors stay
open until a test closes them.

``python -m devices.sim.locker_sim --tcp 127.0.0.1:5020 --units 1,2`` serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tty
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

from devices import modbus_rtu as rtu

ILLEGAL_FUNCTION = 0x01
ILLEGAL_DATA_ADDRESS = 0x02
ILLEGAL_DATA_VALUE = 0x03
CHANNELS = 8


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request frame the simulator received, and whether a board answered it."""

    at: float
    unit: int
    function: int
    data: bytes
    raw: bytes
    answered: bool


@dataclass(slots=True)
class _Board:
    unit: int
    doors_open: list[bool] = field(default_factory=lambda: [False] * CHANNELS)
    jammed: list[bool] = field(default_factory=lambda: [False] * CHANNELS)
    relay_until: list[float] = field(default_factory=lambda: [0.0] * CHANNELS)
    pulses: list[int] = field(default_factory=lambda: [0] * CHANNELS)
    silent: bool = False
    pulse_refusal: int = 0  # a Modbus exception code answered to pulses, 0 = accept them


class LockerBoardSim:
    """Async context manager serving several board unit ids on one pty or TCP listener."""

    def __init__(
        self,
        units: tuple[int, ...] | list[int] = (1,),
        *,
        transport: Literal["pty", "tcp"] = "pty",
        host: str = "127.0.0.1",
        port: int = 0,
        door_closed_when: int = 1,
        baudrate: int = 9600,
        reply_delay_s: float = 0.0,
    ) -> None:
        self._boards = {unit: _Board(unit) for unit in units}
        self._transport = transport
        self._host = host
        self._port = port
        self.door_closed_when = door_closed_when
        self._gap_s = rtu.inter_frame_gap_s(baudrate)
        self._reply_delay_s = reply_delay_s
        self.requests: list[SimRequest] = []
        self.collisions = 0  # requests that arrived while a reply was still due: bus clash
        self.min_gap_s: float | None = None  # shortest silence seen before a request
        self._decoder = rtu.FrameDecoder(rtu.request_length)
        self._unplugged = False
        self._busy_until = 0.0
        self._last_tx = 0.0
        self._master_fd: int | None = None
        self._slave_fd: int | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.endpoint = ""

    async def __aenter__(self) -> Self:
        if self._transport == "pty":
            self._open_pty()
        else:
            await self._listen()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close_tcp()
        if self._master_fd is not None:
            asyncio.get_running_loop().remove_reader(self._master_fd)
            for fd in (self._master_fd, self._slave_fd):
                if fd is not None:
                    os.close(fd)
            self._master_fd = self._slave_fd = None

    # -- test controls -------------------------------------------------------------------------

    def close_door(self, unit: int, channel: int) -> None:
        """Someone shuts the door of ``channel``."""
        self._boards[unit].doors_open[channel] = False

    def force_open(self, unit: int, channel: int) -> None:
        """The door of ``channel`` opens without a pulse (a crowbar, a bad latch)."""
        self._boards[unit].doors_open[channel] = True

    def jam(self, unit: int, channel: int, on: bool = True) -> None:
        """While jammed, pulses on ``channel`` do not open its door."""
        self._boards[unit].jammed[channel] = on

    def reject_pulses(self, unit: int, code: int = ILLEGAL_DATA_ADDRESS, on: bool = True) -> None:
        """While on, the board answers pulses with exception ``code`` (another board profile)."""
        self._boards[unit].pulse_refusal = code if on else 0

    def silence(self, unit: int, on: bool = True) -> None:
        """While silenced, the board receives but never answers."""
        self._boards[unit].silent = on

    async def unplug(self) -> None:
        """The whole bus goes away: no answers; TCP connections and the listener are closed."""
        self._unplugged = True
        await self._close_tcp()

    async def replug(self) -> None:
        """The bus is back (TCP: listening again on the same port)."""
        self._unplugged = False
        if self._transport == "tcp":
            await self._listen()

    def slow_replies(self, delay_s: float) -> None:
        """Answer every request ``delay_s`` late from now on (0: on time again)."""
        self._reply_delay_s = max(0.0, delay_s)

    def inject_garbage(self, data: bytes) -> None:
        """Put raw bytes on the line towards the master."""
        self._send(data)

    def door_is_open(self, unit: int, channel: int) -> bool:
        """The simulated door state."""
        return self._boards[unit].doors_open[channel]

    def relay_on(self, unit: int, channel: int) -> bool:
        """True while the relay of ``channel`` is energised."""
        return asyncio.get_running_loop().time() < self._boards[unit].relay_until[channel]

    def pulse_count(self, unit: int, channel: int) -> int:
        """Pulses received (and accepted) for one channel."""
        return self._boards[unit].pulses[channel]

    def requests_for(self, unit: int, function: int | None = None) -> list[SimRequest]:
        """Recorded requests addressed to ``unit`` (optionally one function code)."""
        return [
            r
            for r in self.requests
            if r.unit == unit and (function is None or r.function == function)
        ]

    # -- transports ----------------------------------------------------------------------------

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master_fd, self._slave_fd = master, slave
        self.endpoint = os.ttyname(slave)
        asyncio.get_running_loop().add_reader(master, self._pty_readable)

    def _pty_readable(self) -> None:
        assert self._master_fd is not None
        try:
            data = os.read(self._master_fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""  # EIO: no process has the slave open right now
        if data:
            self._received(data)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]
        self.endpoint = f"socket://{self._host}:{self._port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while data := await reader.read(4096):
                self._received(data)
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _close_tcp(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
        if server is not None:
            await server.wait_closed()

    def _send(self, data: bytes) -> None:
        self._last_tx = asyncio.get_running_loop().time()
        if self._master_fd is not None:
            with contextlib.suppress(BlockingIOError):
                os.write(self._master_fd, data)
        for writer in list(self._writers):
            writer.write(data)

    # -- the boards ----------------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        now = asyncio.get_running_loop().time()
        if self._last_tx:
            gap = now - self._last_tx
            self.min_gap_s = gap if self.min_gap_s is None else min(self.min_gap_s, gap)
        for frame in self._decoder.feed(data):
            if now < self._busy_until:
                self.collisions += 1
            self._handle(frame, now)

    def _handle(self, frame: rtu.Frame, now: float) -> None:
        board = self._boards.get(frame.unit)
        answered = board is not None and not board.silent and not self._unplugged
        self.requests.append(
            SimRequest(now, frame.unit, frame.function, frame.data, frame.encode(), answered)
        )
        if board is None or not answered:
            return
        reply = self._reply(board, frame, now)
        if self._reply_delay_s > 0:
            self._busy_until = now + self._reply_delay_s
            asyncio.get_running_loop().call_later(self._reply_delay_s, self._send, reply)
        else:
            self._send(reply)

    def _reply(self, board: _Board, frame: rtu.Frame, now: float) -> bytes:
        fn = frame.function
        if fn not in (rtu.READ_COILS, rtu.READ_DISCRETE_INPUTS, rtu.WRITE_SINGLE_COIL):
            return self._exception(frame, ILLEGAL_FUNCTION)
        if len(frame.data) != 4:
            return self._exception(frame, ILLEGAL_DATA_VALUE)
        address = int.from_bytes(frame.data[:2], "big")
        value = int.from_bytes(frame.data[2:], "big")
        if fn == rtu.WRITE_SINGLE_COIL:
            code = self._write_coil(board, address, value, now)
            return self._exception(frame, code) if code else frame.encode()
        if value < 1 or address + value > CHANNELS:
            return self._exception(frame, ILLEGAL_DATA_ADDRESS)
        if fn == rtu.READ_DISCRETE_INPUTS:
            bits = [self._input_bit(board, ch) for ch in range(CHANNELS)]
        else:
            bits = [now < board.relay_until[ch] for ch in range(CHANNELS)]
        packed = sum(1 << i for i, bit in enumerate(bits[address : address + value]) if bit)
        return rtu.encode(board.unit, fn, bytes((1, packed)))

    def _input_bit(self, board: _Board, channel: int) -> bool:
        closed_bit = self.door_closed_when
        return bool(1 - closed_bit if board.doors_open[channel] else closed_bit)

    def _write_coil(self, board: _Board, address: int, value: int, now: float) -> int:
        """Apply a function-05 write; returns 0 or the Modbus exception code."""
        if rtu.PULSE_BASE_ADDRESS <= address < rtu.PULSE_BASE_ADDRESS + CHANNELS:
            return self._pulse(board, address - rtu.PULSE_BASE_ADDRESS, value, now)
        if address == rtu.ALL_RELAYS_ADDRESS and value == 0:
            board.relay_until = [0.0] * CHANNELS
            return 0
        if address < CHANNELS and value in (0x0000, 0xFF00):
            board.relay_until[address] = float("inf") if value else 0.0
            return 0
        known = address == rtu.ALL_RELAYS_ADDRESS or address < CHANNELS
        return ILLEGAL_DATA_VALUE if known else ILLEGAL_DATA_ADDRESS

    @staticmethod
    def _pulse(board: _Board, channel: int, tenths: int, now: float) -> int:
        if board.pulse_refusal:
            return board.pulse_refusal
        if not 1 <= tenths <= 0xFF:
            return ILLEGAL_DATA_VALUE
        board.pulses[channel] += 1
        board.relay_until[channel] = now + tenths * 0.1
        if not board.jammed[channel]:
            board.doors_open[channel] = True
        return 0

    @staticmethod
    def _exception(frame: rtu.Frame, code: int) -> bytes:
        return rtu.encode(frame.unit, frame.function | rtu.EXCEPTION_FLAG, bytes((code,)))


async def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devices.sim.locker_sim")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tcp", metavar="HOST:PORT", help="listen here (default: a pty)")
    parser.add_argument("--units", default="1", help="comma-separated unit ids (default 1)")
    parser.add_argument("--door-closed-when", type=int, choices=(0, 1), default=1)
    args = parser.parse_args(argv)
    units = [int(u) for u in args.units.split(",")]
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        sim = LockerBoardSim(
            units,
            transport="tcp",
            host=host,
            port=int(port),
            door_closed_when=args.door_closed_when,
        )
    else:
        sim = LockerBoardSim(units, door_closed_when=args.door_closed_when)
    async with sim:
        sys.stdout.write(f"locker boards {units} at {sim.endpoint}\n")
        sys.stdout.flush()
        await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
