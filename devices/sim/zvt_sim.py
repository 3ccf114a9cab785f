"""A ZVT payment terminal simulator that speaks the real bytes, for tests and the demo.

Serves on a pty (``transport="pty"``; ``endpoint`` is the slave path), on TCP with serial framing
(``"socket"``; ``socket://host:port``) or on TCP with bare APDUs (``"tcp"``; ``tcp://host:port``).
A transaction is booked in ``ledger`` only when the ECR acknowledges its 04 0F; without that
acknowledgement the terminal reverses it (``reversed``). Tests switch ``faults`` at run time.

``python -m devices.sim.zvt_sim --tcp 127.0.0.1:20007 [--bare]`` serves until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import tty
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, NoReturn, Self

import structlog

from devices import zvt_codec as codec
from devices.errors import DeviceProtocolError
from devices.zvt_codec import Apdu

_log = structlog.get_logger(__name__)

SimTransport = Literal["pty", "socket", "tcp"]
EntryKind = Literal["authorization", "reversal", "end_of_day", "unsolicited"]


@dataclass(slots=True)
class SimFaults:
    """Fault switches; tests change them while the simulator runs."""

    outcome: Literal["approve", "decline", "timeout"] = "approve"
    card_delay_s: float = 0.0  # customer takes this long to present the card
    status_every_s: float | None = None  # while waiting, send 04 FF 0A this often
    drop_acks: int = 0  # swallow the next N frames without ACK, as if lost on the line
    naks: int = 0  # answer the next N frames with NAK
    garbage: bytes = b""  # noise written before every outgoing message while set
    silent: bool = False  # ignore everything, answer nothing
    disconnect_at: Literal["card", "status_info", "completion"] | None = None  # one-shot; TCP
    bad_status_info: bool = False  # append a BMP of unknown id and length to the next 04 0F
    status_timeout_min: int | None = None  # 04 FF carry this <timeout> (sets the ECR's T4)
    unmasked_pan: bool = False  # a faulty terminal: BMP 22 carries the full PAN
    refuse_abort: bool = False  # answer the ECR's 06 B0 with 84 83 00
    reject: int | None = None  # answer every command with 84 <reject> 00
    # one-shot: after the next Registration's 80 00 00, finish a transaction of this amount that
    # was started before the ECR came back (04 0F, booked only if acknowledged)
    finish_at_registration: int | None = None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One transaction the terminal booked (or reversed for want of an acknowledgement)."""

    kind: EntryKind
    trace_no: int
    receipt_no: int | None
    amount_minor: int
    result_code: int
    reversal_of: int | None = None


class _Gone(Exception):
    """The connection ended."""


_GONE = object()


@dataclass(frozen=True, slots=True)
class _Push:
    """A test action run by the terminal logic between commands."""

    run: Callable[[_Conn], Awaitable[None]]


_PAN = "5413330089681234"  # Luhn-valid, so leak scans can find it
_MASKED_PAN = "541333******1234"


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    write: Callable[[bytes], None]
    close: Callable[[], None]
    inbox: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    ack: asyncio.Future[bool] | None = None
    unplugged: bool = False  # after a simulated disconnect nothing more is heard or said


class ZvtSimulator:
    """An async context manager serving one ECR connection at a time."""

    def __init__(
        self,
        transport: SimTransport = "socket",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        t2_s: float = 0.5,
        t3_s: float = 0.5,
        terminal_id: str = "12345678",
    ) -> None:
        self.transport = transport
        self.faults = SimFaults()
        self.ledger: list[LedgerEntry] = []
        self.reversed: list[LedgerEntry] = []
        self.received: list[Apdu] = []  # every APDU the ECR sent, in order
        self.endpoint = ""
        self.errors: list[BaseException] = []
        self._host, self._port, self._t2_s, self._t3_s = host, port, t2_s, t3_s
        self._tid = terminal_id
        self._trace = 0
        self._receipt = 0
        self._last_info: Apdu | None = None
        self._conn: _Conn | None = None
        self._session_lock = asyncio.Lock()
        self._server: asyncio.Server | None = None
        self._pty_task: asyncio.Task[None] | None = None
        self._fds: tuple[int, int] | None = None
        self.connections = 0
        self._changed = asyncio.Event()

    # --- serving ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self.transport == "pty":
            master, slave = os.openpty()
            tty.setraw(slave)
            os.set_blocking(master, False)
            self._fds = (master, slave)
            self.endpoint = os.ttyname(slave)
            self._pty_task = asyncio.create_task(self._serve_pty(master), name="zvt-sim-pty")
        else:
            self._server = await asyncio.start_server(self._on_client, self._host, self._port)
            port = self._server.sockets[0].getsockname()[1]
            scheme = "tcp" if self.transport == "tcp" else "socket"
            self.endpoint = f"{scheme}://{self._host}:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        if self._conn is not None:
            self._conn.close()
        if self._pty_task is not None:
            self._pty_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pty_task
        async with self._session_lock:
            pass
        if self._server is not None:
            await self._server.wait_closed()
        if self._fds is not None:
            for fd in self._fds:
                os.close(fd)
        if self.errors:
            raise self.errors[0]

    async def _serve_pty(self, master: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()

        def readable() -> None:
            try:
                data = os.read(master, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                reader.feed_data(data)
            else:
                loop.remove_reader(master)
                reader.feed_eof()

        def write(data: bytes) -> None:
            with contextlib.suppress(BlockingIOError):
                os.write(master, data)

        loop.add_reader(master, readable)
        try:
            while not reader.at_eof():  # a pty cannot be unplugged: serve it again
                await self._session(_Conn(reader, write, lambda: None))
        finally:
            loop.remove_reader(master)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._conn is not None:
            self._conn.close()
        await self._session(_Conn(reader, writer.write, writer.close))
        writer.close()

    async def _session(self, conn: _Conn) -> None:
        async with self._session_lock:
            self._conn = conn
            self.connections += 1
            try:
                async with asyncio.TaskGroup() as tg:
                    reader = tg.create_task(self._read(conn), name="zvt-sim-reader")
                    with contextlib.suppress(_Gone):
                        await self._logic(conn)
                    reader.cancel()
            except Exception as err:  # noqa: BLE001 - surfaced by __aexit__ so tests fail loudly
                self.errors.append(err)
            finally:
                self._conn = None

    async def _read(self, conn: _Conn) -> None:
        framed = self.transport != "tcp"
        decoder, splitter = codec.FrameDecoder(), codec.ApduSplitter()
        try:
            while data := await conn.reader.read(4096):
                self._changed.set()
                if framed:
                    self._feed_framed(conn, decoder, data)
                elif not self.faults.silent:
                    for apdu in splitter.feed(data):
                        self._received(conn, apdu)
        except OSError:
            pass
        conn.inbox.put_nowait(_GONE)

    def _feed_framed(self, conn: _Conn, decoder: codec.FrameDecoder, data: bytes) -> None:
        faults = self.faults
        for event in decoder.feed(data):
            if faults.silent or conn.unplugged:
                continue
            if isinstance(event, codec.Control):
                if conn.ack is not None and not conn.ack.done():
                    conn.ack.set_result(event is codec.Control.ACK)
            elif isinstance(event, codec.FrameBad):
                conn.write(bytes([codec.NAK]))
            elif faults.drop_acks > 0:
                faults.drop_acks -= 1
            elif faults.naks > 0:
                faults.naks -= 1
                conn.write(bytes([codec.NAK]))
            else:
                conn.write(bytes([codec.ACK]))
                with contextlib.suppress(DeviceProtocolError):
                    self._received(conn, codec.decode_apdu(event.apdu))

    def _received(self, conn: _Conn, apdu: Apdu) -> None:
        self.received.append(apdu)
        conn.inbox.put_nowait(apdu)
        self._changed.set()

    async def _send(self, conn: _Conn, apdu: Apdu, *, wait_ack: bool = True) -> None:
        """Send one message; framed: wait T2 for ACK, repeat twice, then give up (connection)."""
        if self.faults.silent:
            return
        raw = apdu.encode()
        if self.transport == "tcp" or not wait_ack:
            conn.write(
                self.faults.garbage + (raw if self.transport == "tcp" else codec.encode_frame(raw))
            )
            return
        frame = codec.encode_frame(raw)
        for _ in range(3):
            conn.ack = asyncio.get_running_loop().create_future()
            conn.write(self.faults.garbage + frame)
            try:
                async with asyncio.timeout(self._t2_s):
                    if await conn.ack:
                        return
            except TimeoutError:
                continue
            finally:
                conn.ack = None
        raise _Gone

    async def _next(self, conn: _Conn, timeout_s: float | None) -> Apdu | None:
        """The next APDU from the ECR, or None after ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                item = await conn.inbox.get()
        except TimeoutError:
            return None
        if isinstance(item, Apdu):
            return item
        if isinstance(item, _Push):
            await item.run(conn)
            return await self._next(conn, timeout_s)
        raise _Gone

    async def _await_ack(self, conn: _Conn) -> bool:
        """Wait T3 for the ECR's 80 00 00; an 06 B0 meanwhile is refused (too late to abort)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._t3_s
        while (apdu := await self._next(conn, max(0.0, deadline - loop.time()))) is not None:
            if (apdu.cls, apdu.instr) == (0x80, 0x00):
                return True
            if (apdu.cls, apdu.instr) == (0x06, 0xB0):
                await self._send(conn, Apdu(0x84, 0x83))
        return False

    async def _say(self, conn: _Conn, apdu: Apdu) -> bool:
        await self._send(conn, apdu)
        return await self._await_ack(conn)

    def _disconnect(self, conn: _Conn) -> NoReturn:
        self.faults.disconnect_at = None
        conn.unplugged = True
        conn.close()
        raise _Gone

    # --- terminal logic -----------------------------------------------------------------------

    async def _logic(self, conn: _Conn) -> None:
        handlers = {
            (0x06, 0x00): self._registration,
            (0x06, 0x01): self._authorization,
            (0x06, 0x30): self._reversal,
            (0x06, 0x50): self._end_of_day,
            (0x05, 0x01): self._status_enquiry,
            (0x06, 0x20): self._repeat_receipt,
        }
        while True:
            apdu = await self._next(conn, None)
            if apdu is None:
                continue
            control = (apdu.cls, apdu.instr)
            if self.faults.reject is not None and apdu.cls not in (0x80, 0x84):
                await self._send(conn, Apdu(0x84, self.faults.reject))
            elif control in handlers:
                await handlers[control](conn, apdu)
            elif control == (0x06, 0x02):
                await self._send(conn, codec.build_ack())
            elif control == (0x06, 0xB0):
                refuse = self.faults.refuse_abort
                await self._send(conn, Apdu(0x84, 0x83) if refuse else codec.build_ack())
            elif apdu.cls not in (0x80, 0x84):
                await self._send(conn, Apdu(0x84, 0x83))

    async def _registration(self, conn: _Conn, apdu: Apdu) -> None:
        await self._send(conn, codec.build_ack())
        if (amount := self.faults.finish_at_registration) is not None:
            self.faults.finish_at_registration = None
            await self._book(conn, self._entry("authorization", amount, 0, True))
        data = b"\x19\x00\x29" + codec.bcd_encode(int(self._tid), 4) + b"\x49\x09\x78"
        await self._say(conn, Apdu(0x06, 0x0F, data))

    async def _status(self, conn: _Conn, code: int) -> None:
        minutes = self.faults.status_timeout_min
        timeout = b"" if minutes is None else codec.bcd_encode(minutes, 1)
        await self._say(conn, Apdu(0x04, 0xFF, bytes([code]) + timeout))

    async def _wait_for_card(self, conn: _Conn) -> bool:
        """True when the card came; False when the ECR aborted (06 B0) meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.faults.card_delay_s
        while (remaining := deadline - loop.time()) > 0:
            every = self.faults.status_every_s
            apdu = await self._next(conn, min(remaining, every) if every else remaining)
            if apdu is None:
                if every and deadline - loop.time() > 0:
                    await self._status(conn, 0x0A)
            elif (apdu.cls, apdu.instr) == (0x06, 0xB0) and not self.faults.refuse_abort:
                await self._send(conn, codec.build_ack())
                return False
            elif (apdu.cls, apdu.instr) == (0x06, 0xB0):
                await self._send(conn, Apdu(0x84, 0x83))
        return True

    async def _authorization(self, conn: _Conn, apdu: Apdu) -> None:
        bmps = {bmp.id: bmp.value for bmp in codec.parse_bmps(apdu.data)}
        amount = codec.bcd_decode(bmps[0x04])
        await self._send(conn, codec.build_ack())
        await self._status(conn, 0x0A)
        if self.faults.disconnect_at == "card":
            self._disconnect(conn)
        if not await self._wait_for_card(conn) or self.faults.outcome == "timeout":
            await self._say(conn, Apdu(0x06, 0x1E, b"\x6c"))
            return
        await self._status(conn, 0x01)
        await self._status(conn, 0x0E)
        approved = self.faults.outcome == "approve"
        entry = self._entry("authorization", amount, 0x00 if approved else 0x05, approved)
        if not await self._book(conn, entry):
            return
        await self._status(conn, 0x0B)
        if self.faults.disconnect_at == "completion":
            self._disconnect(conn)
        await self._say(conn, Apdu(0x06, 0x0F) if approved else Apdu(0x06, 0x1E, b"\x05"))

    def _entry(
        self,
        kind: EntryKind,
        amount: int,
        result: int,
        receipt: bool,
        reversal_of: int | None = None,
    ) -> LedgerEntry:
        self._trace += 1
        if receipt:
            self._receipt += 1
        receipt_no = self._receipt if receipt else None
        return LedgerEntry(kind, self._trace, receipt_no, amount, result, reversal_of)

    async def _book(self, conn: _Conn, entry: LedgerEntry) -> bool:
        """Send the 04 0F; the entry is booked only if the ECR acknowledges it within T3."""
        info = self._status_info(entry)
        if self.faults.bad_status_info:
            self.faults.bad_status_info = False
            info = Apdu(0x04, 0x0F, info.data + b"\x7f\x01")
        if self.faults.disconnect_at == "status_info":  # the line dies right after the 04 0F
            await self._send(conn, info, wait_ack=False)
            self._reverse(entry)
            self._disconnect(conn)
        await self._send(conn, info)
        if not await self._await_ack(conn):
            self._reverse(entry)
            return False
        self.ledger.append(entry)
        self._last_info = info
        self._changed.set()
        return True

    def _reverse(self, entry: LedgerEntry) -> None:
        self.reversed.append(entry)
        self._changed.set()
        _log.info("zvt_sim.reversed", trace_no=entry.trace_no)

    def _status_info(self, entry: LedgerEntry) -> Apdu:
        now = dt.datetime.now()  # the terminal keeps local time
        data = bytearray(b"\x27" + bytes([entry.result_code]))
        data += b"\x04" + codec.bcd_encode(entry.amount_minor, 6)
        data += b"\x0b" + codec.bcd_encode(entry.trace_no, 3)
        data += b"\x0c" + bytes.fromhex(now.strftime("%H%M%S"))
        data += b"\x0d" + bytes.fromhex(now.strftime("%m%d"))
        data += b"\x29" + codec.bcd_encode(int(self._tid), 4) + b"\x49\x09\x78"
        if entry.kind != "end_of_day":
            pan = _PAN if self.faults.unmasked_pan else _MASKED_PAN
            data += b"\x22" + codec.encode_llvar(codec.encode_pan(pan)) + b"\x0e\x28\x12"
            data += b"\x3b" + b"A1B2C3".ljust(8, b"\x00") + b"\x8a\x06"
            data += b"\x8b" + codec.encode_llvar(b"Mastercard\x00")
            data += b"\x06\x05" + b"\x1f\x10\x02\x00\x01"  # a TLV container the ECR skips
        if entry.receipt_no is not None:
            data += b"\x87" + codec.bcd_encode(entry.receipt_no, 2)
        return Apdu(0x04, 0x0F, bytes(data))

    async def _reversal(self, conn: _Conn, apdu: Apdu) -> None:
        bmps = {bmp.id: bmp.value for bmp in codec.parse_bmps(apdu.data[3:])}
        receipt = codec.bcd_decode(bmps.get(0x87, b""))
        await self._send(conn, codec.build_ack())
        await self._status(conn, 0x0E)
        reversed_already = {e.reversal_of for e in self.ledger if e.kind == "reversal"}
        original = next(
            (
                e
                for e in self.ledger
                if e.kind == "authorization" and e.receipt_no == receipt and e.result_code == 0
            ),
            None,
        )
        if original is None or receipt in reversed_already:
            await self._say(conn, Apdu(0x06, 0x1E, b"\xb5" if original is None else b"\xb4"))
            return
        entry = self._entry("reversal", original.amount_minor, 0, True, reversal_of=receipt)
        if await self._book(conn, entry):
            await self._say(conn, Apdu(0x06, 0x0F))

    async def _end_of_day(self, conn: _Conn, apdu: Apdu) -> None:
        await self._send(conn, codec.build_ack())
        await self._status(conn, 0x0E)
        last_eod = max((i for i, e in enumerate(self.ledger) if e.kind == "end_of_day"), default=-1)
        total = sum(
            e.amount_minor * (1 if e.kind == "authorization" else -1)
            for e in self.ledger[last_eod + 1 :]
            if e.result_code == 0 and e.kind in ("authorization", "reversal")
        )
        if await self._book(conn, self._entry("end_of_day", total, 0, False)):
            await self._say(conn, Apdu(0x06, 0x0F))

    async def _status_enquiry(self, conn: _Conn, apdu: Apdu) -> None:
        await self._send(conn, codec.build_ack())
        await self._say(conn, Apdu(0x06, 0x0F, codec.encode_lllvar(b"SIM-ZVT 1.0") + b"\x00"))

    async def _repeat_receipt(self, conn: _Conn, apdu: Apdu) -> None:
        await self._send(conn, codec.build_ack())
        wants_info = len(apdu.data) >= 5 and apdu.data[3] == 0x03 and apdu.data[4] & 1
        if self._last_info is None:
            await self._say(conn, Apdu(0x06, 0x1E, b"\x83"))
            return
        if wants_info:
            await self._say(conn, self._last_info)
        await self._say(conn, Apdu(0x06, 0x0F))

    # --- test controls ------------------------------------------------------------------------

    async def push_status_info(self, amount_minor: int = 500) -> bool:
        """Send an unsolicited 04 0F; returns True if the ECR acknowledged (and so booked) it."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("no ECR connected")
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        async def push(conn: _Conn) -> None:
            entry = self._entry("unsolicited", amount_minor, 0, True)
            done.set_result(await self._book(conn, entry))

        conn.inbox.put_nowait(_Push(push))
        return await done

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Wait until ``predicate()`` holds; re-checked whenever bytes arrive or the ledger changes."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def send_raw(self, data: bytes) -> None:
        """Write raw bytes to the ECR (garbage, half frames)."""
        if self._conn is not None:
            self._conn.write(data)


async def _main() -> None:
    parser = argparse.ArgumentParser(description="ZVT terminal simulator")
    parser.add_argument("--tcp", required=True, metavar="HOST:PORT")
    parser.add_argument("--bare", action="store_true", help="ZVT over TCP (tcp://), no framing")
    args = parser.parse_args()
    host, _, port = args.tcp.rpartition(":")
    transport: SimTransport = "tcp" if args.bare else "socket"
    async with ZvtSimulator(transport, host=host, port=int(port), t2_s=5, t3_s=5) as sim:
        _log.info("zvt_sim.serving", endpoint=sim.endpoint)
        await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main())
