"""ZVT payment terminal, ECR side: the settings model and the driver.

The driver keeps one link to the terminal (a serial line or ``socket://`` carrying framed bytes
with ACK/NAK, or ``tcp://`` carrying bare APDUs), registers on every (re)connect, checks health
with a Status enquiry while idle, and runs one operation at a time for its owner.

**Commit point** (PA00P015 §2.2.8): the terminal books a transaction when the ECR acknowledges
its Status-Information (04 0F). The driver therefore awaits ``on_status_info(info)`` *before* it
sends that ``80 00 00``; the owner commits the payment as ``confirming`` inside the callback. If
the callback raises, nothing is acknowledged (the terminal reverses the booking) and the
exception propagates out of the operation.

Errors raised by operations: ``DeviceUnavailable``/``DeviceTimeout`` (link down, T2/T3/T4
expired), ``DeviceRejected`` (``84 xx``), ``DeviceProtocolError``, ``TerminalBusy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Self, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from devices import zvt_codec as codec
from devices.errors import (
    DeviceError,
    DeviceProtocolError,
    DeviceRejected,
    DeviceTimeout,
    DeviceUnavailable,
)
from devices.transport import EndpointKind, SerialParams, endpoint_kind, open_endpoint
from devices.zvt_codec import Apdu, IntermediateStatus, StatusInfo, TerminalStatus
from devices.zvt_link import Link, LinkCounts, LinkTiming
from gateway.backoff import Backoff
from gateway.linkstate import DeviceState

#: ISO 4217 alpha → numeric code sent in BMP 49.
CURRENCIES: dict[str, int] = {
    "EUR": 978, "CHF": 756, "GBP": 826, "USD": 840, "SEK": 752, "DKK": 208, "PLN": 985,
    "CZK": 203, "NOK": 578, "HUF": 348,
}  # fmt: skip

_T = TypeVar("_T")


class ZvtSettings(BaseModel):
    """One ZVT payment terminal in the gateway configuration."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Terminal id used in logs, health and device.status (A-Z a-z 0-9 _ . -).",
    )
    endpoint: str = Field(
        description="Serial device path (/dev/ttyUSB0, /dev/serial/by-id/...), socket://host:port "
        "(serial tunnelled over TCP) or tcp://host:20007 (ZVT over TCP, bare APDUs)."
    )
    pos_terminals: list[str] = Field(
        default_factory=list,
        description="POS terminal ids whose card payments run on this terminal.",
    )
    password: str = Field(
        default="000000", pattern=r"^[0-9]{6}$", description="Terminal password, 6 digits."
    )
    currency: str = Field(default="EUR", description="ISO 4217 alpha code sent in Registration.")
    baudrate: int = Field(default=9600, gt=0, description="Serial line speed (serial endpoints).")
    stopbits: Literal[1, 2] = Field(default=2, description="Serial stop bits (ZVT: 2).")
    config_byte: int = Field(
        default=0x08,
        ge=0,
        le=0xFF,
        description="Registration config byte; 0x08 = send intermediate status, terminal prints.",
    )
    status_interval_s: float = Field(
        default=60.0, gt=0, description="Status enquiry (health check) interval while idle."
    )
    t1_ms: float = Field(default=200, gt=0, description="Serial: max gap between bytes of a frame.")
    t2_s: float = Field(default=5, gt=0, description="Serial: wait for ACK/NAK of a frame.")
    t3_s: float = Field(default=5, gt=0, description="Wait from a command to its 80 00 00 / 84 xx.")
    t4_s: float = Field(
        default=180, gt=0, description="Wait for Completion/Abort; reset by every 04 FF and 04 0F."
    )
    connect_timeout_s: float = Field(default=5, gt=0, description="Opening the endpoint.")
    end_of_day_at: datetime.time | None = Field(
        default=None,
        description='Local time ("HH:MM") of a daily End-of-Day on this terminal: run once per '
        "local day from that time on, when the clock is synced and no payment runs on the "
        "terminal. Unset: only on the payment.end_of_day command.",
    )

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        endpoint_kind(value)
        return value

    @field_validator("end_of_day_at")
    @classmethod
    def _check_end_of_day_at(cls, value: datetime.time | None) -> datetime.time | None:
        if value is not None and value.tzinfo is not None:
            raise ValueError("a local time without a zone, e.g. 22:30")
        return value

    @field_validator("currency")
    @classmethod
    def _check_currency(cls, value: str) -> str:
        if value not in CURRENCIES:
            raise ValueError(f"unsupported currency {value!r}; supported: {', '.join(CURRENCIES)}")
        return value


class TerminalBusy(DeviceError):
    """Another operation is running on this terminal; try again when it has finished."""


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """How an operation ended.

    ``completed``: Completion 06 0F. ``aborted``: Abort 06 1E with ``abort_code`` (6C = customer
    timeout or abort key, 05 = declined). ``timeout``: the 04 0F was acknowledged (so it is
    booked and ``status_info`` is final) but no Completion followed before T4 or link loss.
    """

    outcome: Literal["completed", "aborted", "timeout"]
    status_info: StatusInfo | None = None
    abort_code: int | None = None


@dataclass(frozen=True, slots=True)
class ZvtCounters:
    """Link health counters since the driver was created."""

    garbage_bytes: int = 0
    naks_sent: int = 0
    naks_received: int = 0
    retransmissions: int = 0
    protocol_errors: int = 0


IntermediateCallback = Callable[[IntermediateStatus], Awaitable[None]]
StatusInfoCallback = Callable[[StatusInfo], Awaitable[None]]
UnsolicitedCallback = Callable[[StatusInfo], Awaitable[bool]]
StateCallback = Callable[[DeviceState, str | None], None]


class _Marker:
    """Queue marker: the link is gone (``LOST``) or the owner asked run() to finish (``CLOSE``)."""

    def __init__(self, name: str) -> None:
        self.name = name


_LOST = _Marker("lost")
_CLOSE = _Marker("close")


@dataclass(frozen=True, slots=True)
class _Ending:
    kind: Literal["completed", "aborted", "timeout"]
    data: bytes = b""
    status_info: StatusInfo | None = None
    abort_code: int | None = None


@dataclass(slots=True)
class _Flow:
    """What the running exchange expects and what it has booked so far."""

    expects_info: bool
    on_intermediate: IntermediateCallback | None = None
    on_status_info: StatusInfoCallback | None = None
    booked: StatusInfo | None = None
    t4_s: float | None = None  # set by a 04 FF that carries a timeout


def _reraise_lost_cancellation() -> None:
    """Python 3.11's TaskGroup drops a cancel that arrives while it unwinds a child's error."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def currency_code(alpha: str) -> int:
    """ISO 4217 numeric code of a supported alpha code; ValueError otherwise."""
    try:
        return CURRENCIES[alpha]
    except KeyError:
        raise ValueError(f"unsupported currency {alpha!r}") from None


class ZvtTerminal:
    """Driver for one ZVT terminal: an async context manager whose ``run()`` the owner supervises.

    ``on_unsolicited_status_info(info)`` is awaited for a 04 0F that arrives while no operation
    runs; the driver acknowledges it (the terminal books it) only if the callback returns True.
    """

    def __init__(
        self,
        settings: ZvtSettings,
        *,
        on_state: StateCallback | None = None,
        on_unsolicited_status_info: UnsolicitedCallback | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self._on_state = on_state
        self._on_unsolicited = on_unsolicited_status_info
        self._backoff = backoff if backoff is not None else Backoff()
        self._log: structlog.typing.FilteringBoundLogger = structlog.get_logger(__name__).bind(
            device_id=settings.id
        )
        self._state = DeviceState.OFFLINE
        self._counts = LinkCounts()
        self._link: Link | None = None
        self._lock = asyncio.Lock()  # one exchange with the terminal at a time
        self._busy = False  # an owner operation is running (or waiting for the lock)
        self._ops: asyncio.Queue[Apdu | _Marker] | None = None  # inbox of the running exchange
        self._idle: asyncio.Queue[Apdu | _Marker] = asyncio.Queue()  # everything else
        self._answered = asyncio.Event()  # the running command got its 80 00 00
        self._abort_reply: asyncio.Future[Apdu] | None = None
        self._closing = False
        self._running = False
        self._stopped = asyncio.Event()
        self._outage_logged = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def state(self) -> DeviceState:
        """online after Registration succeeded, offline while the link is down, error if refused."""
        return self._state

    @property
    def busy(self) -> bool:
        """An owner operation is running."""
        return self._busy

    @property
    def counters(self) -> ZvtCounters:
        """A snapshot of the link counters."""
        c = self._counts
        return ZvtCounters(
            c.garbage_bytes, c.naks_sent, c.naks_received, c.retransmissions, c.protocol_errors
        )

    # --- supervision ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, register, health-check and reconnect with backoff until aclose().

        Never raises for device trouble; exceptions raised by the owner's callbacks propagate.
        """
        self._running = True
        self._stopped.clear()
        try:
            while not self._closing:
                try:
                    await self._connect_and_serve()
                except* DeviceError as group:
                    self._went_down(group.exceptions[0])
                _reraise_lost_cancellation()
                if not self._closing:
                    await self._backoff.wait()
        finally:
            self._running = False
            self._stopped.set()

    async def aclose(self) -> None:
        """Ask run() to log off and return, and wait (bounded) until it has."""
        self._closing = True
        self._idle.put_nowait(_CLOSE)
        self._backoff.wake()
        if self._running:
            s = self.settings
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3 * s.t2_s + s.t3_s + 1):
                    await self._stopped.wait()

    async def _connect_and_serve(self) -> None:
        s = self.settings
        params = SerialParams(baudrate=s.baudrate, stopbits=s.stopbits)
        async with open_endpoint(s.endpoint, params, connect_timeout_s=s.connect_timeout_s) as (
            reader,
            writer,
        ):
            link = Link(
                reader,
                writer,
                framed=endpoint_kind(s.endpoint) is not EndpointKind.TCP,
                timing=LinkTiming(t1_s=s.t1_ms / 1000, t2_s=s.t2_s),
                counts=self._counts,
                log=self._log,
                on_apdu=self._route,
                on_lost=self._on_link_lost,
            )
            self._link = link
            try:
                async with asyncio.TaskGroup() as tg:
                    pump = tg.create_task(link.pump(), name=f"zvt-{s.id}-reader")
                    await self._serve(link)
                    pump.cancel()
            finally:
                self._link = None

    async def _serve(self, link: Link) -> None:
        try:
            await self._register()
            self._came_up()
            while True:
                try:
                    async with asyncio.timeout(self.settings.status_interval_s):
                        item = await self._idle.get()
                except TimeoutError:
                    if not self._busy and not self._lock.locked():
                        await self._health_check()
                    continue
                if item is _LOST and link.error is not None:
                    raise link.error
                if item is _CLOSE:
                    await self._log_off()
                    return
                if isinstance(item, Apdu):
                    await self._unsolicited(link, item)
        except asyncio.CancelledError:
            if link.error is None and not self._lock.locked():
                link.send_nowait(codec.build_log_off())
            raise

    async def _register(self) -> None:
        s = self.settings
        command = codec.build_registration(s.password, s.config_byte, CURRENCIES[s.currency])
        async with self._lock:
            ending = await self._exchange(command)
        if ending.kind == "aborted":
            raise DeviceRejected(
                "registration aborted by the terminal", code=ending.abort_code or 0
            )

    async def _health_check(self) -> None:
        async with self._lock:
            try:
                status = await self._status_enquiry_locked()
            except (DeviceRejected, DeviceProtocolError) as err:
                self._log.warning("zvt.health_check_failed", error=str(err))
                return
        if not status.ready:
            self._log.warning("zvt.terminal_not_ready", status_code=f"{status.status_code:02X}")

    async def _log_off(self) -> None:
        with contextlib.suppress(DeviceError):
            async with self._lock:
                await self._exchange(codec.build_log_off(), completes=False)

    def _came_up(self) -> None:
        self._log.info("zvt.online_again" if self._outage_logged else "zvt.online")
        self._outage_logged = False
        self._backoff.reset()
        self._set_state(DeviceState.ONLINE, None)

    def _went_down(self, err: Exception) -> None:
        if not self._outage_logged:
            self._log.warning("zvt.offline", error=str(err))
            self._outage_logged = True
        else:
            self._log.debug("zvt.still_offline", error=str(err))
        refused = isinstance(err, DeviceRejected)
        self._set_state(DeviceState.ERROR if refused else DeviceState.OFFLINE, str(err))

    def _set_state(self, state: DeviceState, reason: str | None) -> None:
        if state is self._state:
            return
        self._state = state
        if self._on_state is not None:
            self._on_state(state, reason)

    # --- routing -------------------------------------------------------------------------------

    def _route(self, apdu: Apdu) -> None:
        reply = self._abort_reply
        if apdu.cls in (0x80, 0x84) and reply is not None and not reply.done():
            reply.set_result(apdu)
        elif self._ops is not None:
            self._ops.put_nowait(apdu)
        else:
            self._idle.put_nowait(apdu)

    def _on_link_lost(self) -> None:
        self._idle.put_nowait(_LOST)
        if self._ops is not None:
            self._ops.put_nowait(_LOST)
        reply = self._abort_reply
        if reply is not None and not reply.done():
            reply.set_exception(DeviceUnavailable("link lost"))

    def _require_link(self) -> Link:
        link = self._link
        if link is None or link.error is not None:
            raise DeviceUnavailable(f"terminal {self.settings.id} is offline")
        return link

    async def _unsolicited(self, link: Link, apdu: Apdu) -> None:
        async with self._lock:
            if (apdu.cls, apdu.instr) == (0x04, 0x0F):
                with contextlib.suppress(DeviceProtocolError):
                    await self._unsolicited_info(link, self._decode(codec.decode_status_info, apdu))
            elif apdu.cls in (0x80, 0x84):
                self._log.info("zvt.stray_answer", control=str(apdu))
            else:
                await link.send(codec.build_ack())
                self._log.info("zvt.unsolicited_message", control=str(apdu))

    async def _unsolicited_info(self, link: Link, info: StatusInfo) -> None:
        claimed = self._on_unsolicited is not None and await self._on_unsolicited(info)
        if claimed:
            await link.send(codec.build_ack())
            return
        self._log.warning(
            "zvt.unsolicited_status_info_not_acknowledged",
            result_code=info.result_code,
            trace_no=info.trace_no,
            receipt_no=info.receipt_no,
            amount_minor=info.amount_minor,
        )

    def _decode(self, decode: Callable[[bytes], _T], apdu: Apdu) -> _T:
        try:
            return decode(apdu.data)
        except DeviceProtocolError as err:
            self._counts.protocol_errors += 1
            self._log.warning("zvt.protocol_error", control=str(apdu), error=str(err))
            raise

    # --- exchanges -----------------------------------------------------------------------------

    async def _next(
        self, link: Link, inbox: asyncio.Queue[Apdu | _Marker], timeout_s: float, what: str
    ) -> Apdu:
        try:
            async with asyncio.timeout(timeout_s):
                item = await inbox.get()
        except TimeoutError as err:
            raise DeviceTimeout(f"no {what} within {timeout_s:g} s") from err
        if isinstance(item, Apdu):
            return item
        raise link.error or DeviceUnavailable("link lost")

    async def _exchange(
        self,
        command: Apdu,
        *,
        completes: bool = True,
        flow: _Flow | None = None,
    ) -> _Ending:
        """Send ``command`` and follow it to its Completion/Abort; the caller holds the lock."""
        link = self._require_link()
        flow = flow if flow is not None else _Flow(expects_info=False)
        inbox: asyncio.Queue[Apdu | _Marker] = asyncio.Queue()
        self._ops = inbox
        self._answered.clear()
        try:
            await link.send(command)
            msg: Apdu | None = await self._next(
                link, inbox, self.settings.t3_s, f"answer to {command}"
            )
            if msg is not None and msg.cls in (0x80, 0x84):  # some terminals skip 80 00 00
                if msg.cls == 0x84 and msg.instr != 0:
                    raise DeviceRejected(f"terminal refused {command}", code=msg.instr)
                msg = None
            self._answered.set()
            ending = None if completes else _Ending("completed")
            while ending is None:
                if msg is None:
                    t4_s = flow.t4_s or self.settings.t4_s
                    msg = await self._next(link, inbox, t4_s, "Completion or Abort")
                ending = await self._step(link, msg, flow)
                msg = None
            return ending
        except DeviceUnavailable as err:
            link.fail(err)  # T3/T4 expired or the link broke: reconnect to resynchronise
            if flow.booked is None:
                raise
            self._log.warning("zvt.completion_missing", error=str(err))
            return _Ending("timeout", status_info=flow.booked)
        finally:
            self._ops = None

    async def _step(self, link: Link, msg: Apdu, flow: _Flow) -> _Ending | None:
        """Handle one message from the terminal while it is master; an ending ends the exchange."""
        control = (msg.cls, msg.instr)
        if control == (0x04, 0x0F):
            info = self._decode(codec.decode_status_info, msg)
            if not flow.expects_info:
                await self._unsolicited_info(link, info)
                return None
            if flow.on_status_info is not None:
                await flow.on_status_info(info)  # the commit point: strictly before the ack
            await link.send(codec.build_ack())
            flow.booked = info
            return None
        if msg.cls in (0x80, 0x84):  # answers are never acknowledged
            self._log.info("zvt.stray_answer", control=str(msg))
            return None
        if control == (0x04, 0xFF):
            with contextlib.suppress(DeviceProtocolError):
                status = self._decode(codec.decode_intermediate, msg)
                if status.timeout_min:  # the terminal announces a lengthy step (PA00P015 3.7)
                    flow.t4_s = status.timeout_min * 60.0
                if flow.on_intermediate is not None:
                    await flow.on_intermediate(status)
        await link.send(codec.build_ack())
        if control == (0x06, 0x0F):
            return _Ending("completed", msg.data, flow.booked)
        if control == (0x06, 0x1E):
            code = msg.data[0] if msg.data else None
            return _Ending("aborted", msg.data, flow.booked, code)
        return None

    @contextlib.asynccontextmanager
    async def _operation(self) -> AsyncIterator[None]:
        if self._busy:
            raise TerminalBusy(f"terminal {self.settings.id} is busy")
        self._busy = True
        try:
            async with self._lock:
                yield
        finally:
            self._busy = False

    async def _status_enquiry_locked(self) -> TerminalStatus:
        ending = await self._exchange(codec.build_status_enquiry(self.settings.password))
        if ending.kind != "completed":
            raise DeviceRejected("status enquiry aborted", code=ending.abort_code or 0)
        return self._decode(codec.decode_terminal_status, Apdu(0x06, 0x0F, ending.data))

    # --- operations ----------------------------------------------------------------------------

    async def _transaction(
        self,
        command: Apdu,
        on_status_info: StatusInfoCallback | None,
        on_intermediate: IntermediateCallback | None,
    ) -> TransactionResult:
        flow = _Flow(True, on_intermediate, on_status_info)
        async with self._operation():
            ending = await self._exchange(command, flow=flow)
        return TransactionResult(ending.kind, ending.status_info, ending.abort_code)

    async def authorize(
        self,
        amount_minor: int,
        currency: str,
        *,
        on_status_info: StatusInfoCallback,
        on_intermediate: IntermediateCallback | None = None,
    ) -> TransactionResult:
        """Run a payment; ``on_status_info`` is awaited before the 04 0F is acknowledged.

        That acknowledgement is the commit point: if the callback raises, nothing is acknowledged,
        the terminal reverses, and the exception propagates (the same holds for
        ``on_intermediate``). ValueError for an amount outside 1..999999999999 or an unsupported
        currency.
        """
        command = codec.build_authorization(amount_minor, currency_code(currency))
        return await self._transaction(command, on_status_info, on_intermediate)

    async def reversal(
        self,
        receipt_no: int,
        *,
        on_status_info: StatusInfoCallback,
        on_intermediate: IntermediateCallback | None = None,
    ) -> TransactionResult:
        """Reverse the payment with this receipt number (BMP 87); same commit point as authorize."""
        command = codec.build_reversal(self.settings.password, receipt_no)
        return await self._transaction(command, on_status_info, on_intermediate)

    async def end_of_day(
        self,
        *,
        on_status_info: StatusInfoCallback | None = None,
        on_intermediate: IntermediateCallback | None = None,
    ) -> TransactionResult:
        """Close the terminal's batch; the 04 0F carries the totals."""
        command = codec.build_end_of_day(self.settings.password)
        return await self._transaction(command, on_status_info, on_intermediate)

    async def repeat_receipt(
        self,
        *,
        on_status_info: StatusInfoCallback | None = None,
        on_intermediate: IntermediateCallback | None = None,
    ) -> TransactionResult:
        """Ask for the last transaction's 04 0F again (recovery after a crash or lost link)."""
        command = codec.build_repeat_receipt(self.settings.password)
        return await self._transaction(command, on_status_info, on_intermediate)

    async def status_enquiry(self) -> TerminalStatus:
        """Ask the terminal for its status (05 01)."""
        async with self._operation():
            return await self._status_enquiry_locked()

    async def abort(self) -> bool:
        """Ask the terminal to abort (06 B0 00); True if it accepted. Best effort.

        May be called while an authorization waits for the card; the authorization then ends
        with outcome ``aborted`` (code 6C). Raises DeviceUnavailable when offline.
        """
        if not self._busy:
            async with self._lock:
                try:
                    await self._exchange(codec.build_abort(), completes=False)
                except DeviceRejected:
                    return False
                return True
        link = self._require_link()
        t3_s = self.settings.t3_s
        reply: asyncio.Future[Apdu] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(t3_s):
                await self._answered.wait()
            self._abort_reply = reply
            await link.send(codec.build_abort())
            async with asyncio.timeout(t3_s):
                answer = await reply
        except TimeoutError:
            self._log.info("zvt.abort_unanswered")
            return False
        finally:
            self._abort_reply = None
        return answer.cls == 0x80 or answer.instr == 0
