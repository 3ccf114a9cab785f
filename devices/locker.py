"""Locker banks: settings and the driver for Modbus RTU relay/input boards (devices.md).

A bank is one RS-485 bus with one or more boards; each compartment is one relay channel (its
lock) and one door input on one board. ``LockerBank.run()`` polls every board's door inputs,
derives door events and keeps each board's online state; it never raises for device trouble.
Operations (``pulse``, ``open_compartment``) raise ``DeviceUnavailable`` while the board is
offline and ``DeviceRejected`` when the board refuses.
"""

from __future__ import annotations

import asyncio
import enum
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from devices import modbus_rtu as rtu
from devices.errors import DeviceProtocolError, DeviceRejected, DeviceTimeout, DeviceUnavailable
from devices.modbus_rtu import BusCounters, ModbusRtuBus
from devices.transport import EndpointKind, endpoint_kind
from gateway.backoff import Backoff
from gateway.linkstate import DeviceState, StateCell

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")


class CompartmentSettings(BaseModel):
    """One compartment: its number, size and the board channel wired to its lock and door."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    number: int = Field(ge=1, description="Compartment number shown on the door and the kiosk.")
    size: Literal["S", "M", "L"] = Field(description="Compartment size: S, M or L.")
    unit: int = Field(ge=1, le=247, description="Modbus unit id of the board (1..247).")
    channel: int = Field(
        ge=0, le=7, description="Board channel (0..7): relay for the lock, input for the door."
    )


class LockerBankSettings(BaseModel):
    """One locker bank: an RS-485 bus with its boards and compartments."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(description="Bank id used in topics and events ([A-Za-z0-9_-], 1..32).")
    endpoint: str = Field(
        description="Serial line of the bus: a /dev path, or socket://host:port (ser2net, NPort)."
    )
    compartments: tuple[CompartmentSettings, ...] = Field(
        min_length=1, description="The compartments; numbers and (unit, channel) pairs unique."
    )
    baudrate: int = Field(default=9600, gt=0, description="Bus speed in baud (8N1).")
    poll_ms: int = Field(
        default=250, ge=10, le=10_000, description="Interval between door-input polls, in ms."
    )
    pulse_ms: int = Field(
        default=700,
        ge=100,
        le=25_500,
        multiple_of=100,
        description="Lock pulse length in ms, timed by the board (multiple of 100, 100..25500).",
    )
    door_closed_when: Literal[0, 1] = Field(
        default=1, description="Input level that means 'door closed' (1: switch closes the input)."
    )
    door_left_open_s: float = Field(
        default=120.0,
        gt=0,
        description="Alert door_left_open when still open this long after a pulse.",
    )
    response_timeout_ms: int = Field(
        default=300, ge=10, le=10_000, description="How long to wait for a board's reply, in ms."
    )
    retries: int = Field(
        default=2, ge=0, le=10, description="Repeats of an unanswered request before it fails."
    )
    forced_open_window_s: float = Field(
        default=2.0, ge=0, description="A door opening this long after no pulse is forced_open."
    )
    jam_tries: int = Field(
        default=3, ge=1, le=10, description="Pulses without the door opening before 'jammed'."
    )
    open_confirm_s: float = Field(
        default=2.0, gt=0, description="How long to wait for the door to open after each pulse."
    )

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _ID_RE.fullmatch(value):
            raise ValueError("must be 1..32 characters of A-Z, a-z, 0-9, _ or -")
        return value

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        if endpoint_kind(value) is EndpointKind.TCP:
            raise ValueError("locker boards need a serial path or socket://host:port, not tcp://")
        return value

    @model_validator(mode="after")
    def _check_compartments(self) -> Self:
        numbers = [c.number for c in self.compartments]
        if len(set(numbers)) != len(numbers):
            raise ValueError("compartment numbers must be unique")
        wires = [(c.unit, c.channel) for c in self.compartments]
        if len(set(wires)) != len(wires):
            raise ValueError("each (unit, channel) may serve only one compartment")
        return self


class LockerEventKind(enum.StrEnum):
    """What happened; alert kinds use the wire words of ``locker.alert``."""

    OPENED = "opened"
    CLOSED = "closed"
    FORCED_OPEN = "forced_open"
    DOOR_LEFT_OPEN = "door_left_open"
    JAMMED = "jammed"
    BOARD_OFFLINE = "board_offline"
    BOARD_ONLINE = "board_online"


ALERT_KINDS = frozenset(
    {
        LockerEventKind.FORCED_OPEN,
        LockerEventKind.DOOR_LEFT_OPEN,
        LockerEventKind.JAMMED,
        LockerEventKind.BOARD_OFFLINE,
        LockerEventKind.BOARD_ONLINE,
    }
)


@dataclass(frozen=True, slots=True)
class LockerEvent:
    """A door or board event of one bank; ``compartment`` is None for board events."""

    kind: LockerEventKind
    bank: str
    compartment: int | None
    unit: int

    @property
    def is_alert(self) -> bool:
        """True for the kinds reported as ``locker.alert``."""
        return self.kind in ALERT_KINDS


EventCallback = Callable[[LockerEvent], Awaitable[None]]
BeforePulse = Callable[[int], Awaitable[None]]


@dataclass(slots=True)
class _Door:
    settings: CompartmentSettings
    open: bool | None = None  # last level read; kept through an outage to compare afterwards
    pulsed_at: float | None = None
    left_open_armed: bool = False


@dataclass(slots=True)
class _Board:
    unit: int
    doors: list[_Door]
    backoff: Backoff
    online: bool | None = None  # None: not contacted yet
    retry_at: float = 0.0


class LockerBank:
    """Driver of one locker bank; enter it, then run ``run()`` in the owner's TaskGroup."""

    def __init__(
        self,
        settings: LockerBankSettings,
        on_event: EventCallback,
        *,
        clock: Callable[[], float] = time.monotonic,
        backoff_factory: Callable[[], Backoff] = Backoff,
    ) -> None:
        self.settings = settings
        self._on_event = on_event
        self._clock = clock
        self._log = structlog.get_logger(__name__).bind(bank=settings.id)
        self._bus = ModbusRtuBus(
            settings.endpoint,
            baudrate=settings.baudrate,
            response_timeout_s=settings.response_timeout_ms / 1000,
            retries=settings.retries,
            log=self._log,
        )
        self._doors = {c.number: _Door(c) for c in settings.compartments}
        units = sorted({c.unit for c in settings.compartments})
        self._boards = {
            u: _Board(
                u, [d for d in self._doors.values() if d.settings.unit == u], backoff_factory()
            )
            for u in units
        }
        self._link_backoff = backoff_factory()
        self._link_down = False
        self._changed = asyncio.Condition()
        self._state = StateCell(f"locker:{settings.id}", DeviceState.OFFLINE)

    async def __aenter__(self) -> Self:
        await self._bus.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._bus.__aexit__(exc_type, exc, tb)

    # -- observation ---------------------------------------------------------------------------

    @property
    def online(self) -> bool:
        """True when every board of the bank answers."""
        return all(b.online for b in self._boards.values())

    def board_online(self, unit: int) -> bool:
        """True when board ``unit`` answers."""
        return bool(self._boards[unit].online)

    @property
    def state(self) -> DeviceState:
        """ONLINE: all boards answer; ERROR: only some do; OFFLINE: none (or not yet)."""
        return DeviceState(self._state.value)

    @property
    def counters(self) -> BusCounters:
        """Bus error counters: garbage bytes, CRC errors, timeouts, exception replies."""
        return self._bus.counters

    def door_open(self, compartment: int) -> bool | None:
        """True/False from the last poll; None while unknown or the board is offline."""
        door = self._door(compartment)
        if not self._boards[door.settings.unit].online:
            return None
        return door.open

    def add_state_listener(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(name, state)`` whenever :attr:`state` changes."""
        self._state.listeners.append(listener)

    def wake(self) -> None:
        """Retry offline boards and the link now instead of after the backoff delay."""
        for board in self._boards.values():
            board.retry_at = 0.0
        self._link_backoff.wake()

    # -- operations ----------------------------------------------------------------------------

    async def pulse(self, compartment: int) -> None:
        """Pulse the compartment's lock once (board-timed pulse_ms); the board must be online."""
        door = self._door(compartment)
        unit, channel = door.settings.unit, door.settings.channel
        if self._boards[unit].online is False:
            raise DeviceUnavailable(f"bank {self.settings.id}: board {unit} is offline")
        door.pulsed_at = self._clock()
        door.left_open_armed = True
        await self._bus.pulse(unit, channel, self.settings.pulse_ms // 100)
        self._log.info("locker pulse", compartment=compartment, unit=unit, channel=channel)

    async def open_compartment(
        self, compartment: int, *, before_pulse: BeforePulse | None = None
    ) -> bool:
        """Pulse until the door shows open (jam_tries pulses); False and ``jammed`` if never.

        ``before_pulse(try_no)`` is awaited before every pulse (1-based), e.g. to commit the
        audit record of that pulse; an already open door returns True without a pulse.
        """
        if self.door_open(compartment) is True:
            return True
        for try_no in range(1, self.settings.jam_tries + 1):
            if before_pulse is not None:
                await before_pulse(try_no)
            try:
                await self.pulse(compartment)
            except DeviceTimeout:
                # The reply was lost, maybe not the pulse: the door decides; a further try is a
                # new pulse with its own audit (the bus never resends a pulse on its own).
                self._log.warning("locker pulse unanswered", compartment=compartment, try_no=try_no)
            if await self._wait_door(compartment, True, self.settings.open_confirm_s):
                return True
        self._log.warning("locker jammed", compartment=compartment, tries=self.settings.jam_tries)
        await self._emit(LockerEventKind.JAMMED, self._door(compartment).settings.unit, compartment)
        return False

    async def wait_closed(self, compartment: int, timeout_s: float) -> bool:
        """True once the door is seen closed; False if not within ``timeout_s``."""
        return await self._wait_door(compartment, False, timeout_s)

    async def _wait_door(self, compartment: int, want_open: bool, timeout_s: float) -> bool:
        self._door(compartment)
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self.door_open(compartment) is want_open)
        except TimeoutError:
            return False
        return True

    def _door(self, compartment: int) -> _Door:
        try:
            return self._doors[compartment]
        except KeyError:
            raise ValueError(f"bank {self.settings.id} has no compartment {compartment}") from None

    # -- supervision ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll the boards forever; device trouble is reported as events, never raised."""
        loop = asyncio.get_running_loop()
        poll_s = self.settings.poll_ms / 1000
        while True:
            started = loop.time()
            try:
                await self._bus.connect()
            except DeviceUnavailable as err:
                await self._on_link_down(err)
                await self._link_backoff.wait()
                continue
            if self._link_down:
                self._link_down = False
                self._link_backoff.reset()
                self._log.info("locker bus reachable again")
                for board in self._boards.values():
                    board.retry_at = 0.0
            for board in self._boards.values():
                if not await self._poll_board(board):
                    break  # the link dropped: reconnect first
            await asyncio.sleep(max(0.0, started + poll_s - loop.time()))

    async def _poll_board(self, board: _Board) -> bool:
        """One poll of one board; returns False when the link itself was lost."""
        loop = asyncio.get_running_loop()
        if board.online is False and loop.time() < board.retry_at:
            return True
        try:
            if not board.online:
                # a recovery probe tries once: a dead board must not hold up the others for long
                retries = 0 if board.online is False else None
                await self._bus.transact(rtu.all_relays_off(board.unit), retries=retries)
            inputs = await self._bus.read_discrete_inputs(board.unit)
        except DeviceTimeout as err:
            await self._board_down(board, err)
        except DeviceRejected as err:
            await self._board_down(board, err)
        except DeviceUnavailable as err:
            await self._on_link_down(err)
            return False
        except DeviceProtocolError as err:
            self._log.info("locker poll unreadable", unit=board.unit, error=str(err))
        else:
            await self._board_up(board, inputs)
        return True

    async def _board_up(self, board: _Board, inputs: tuple[bool, ...]) -> None:
        events: list[tuple[LockerEventKind, int | None]] = []
        if board.online is False:
            self._log.info("locker board online", unit=board.unit, attempts=board.backoff.attempts)
            events.append((LockerEventKind.BOARD_ONLINE, None))
        board.online = True
        board.backoff.reset()
        now = self._clock()
        for door in board.doors:
            events.extend(self._door_input(door, inputs[door.settings.channel], now))
        await self._changed_state()
        for kind, number in events:
            await self._emit(kind, board.unit, number)

    def _door_input(
        self, door: _Door, level: bool, now: float
    ) -> list[tuple[LockerEventKind, int | None]]:
        is_open = int(level) != self.settings.door_closed_when
        was_open, door.open = door.open, is_open
        number = door.settings.number
        events: list[tuple[LockerEventKind, int | None]] = []
        recent = (
            door.pulsed_at is not None
            and now - door.pulsed_at <= self.settings.forced_open_window_s
        )
        if was_open is not None and was_open != is_open:
            events.append((LockerEventKind.OPENED if is_open else LockerEventKind.CLOSED, number))
            if is_open and not recent:
                events.append((LockerEventKind.FORCED_OPEN, number))
            if not is_open:
                door.left_open_armed = False
        limit_s = self.settings.door_left_open_s
        overdue = door.pulsed_at is not None and now - door.pulsed_at >= limit_s
        if door.left_open_armed and overdue:
            door.left_open_armed = False  # one alert per pulse
            if is_open:
                events.append((LockerEventKind.DOOR_LEFT_OPEN, number))
        return events

    async def _board_down(self, board: _Board, err: Exception) -> None:
        loop = asyncio.get_running_loop()
        board.retry_at = loop.time() + board.backoff.next_delay_s()
        if board.online is False:
            self._log.debug("locker board still offline", unit=board.unit, error=str(err))
            return
        board.online = False
        self._log.warning("locker board offline", unit=board.unit, error=str(err))
        await self._changed_state()
        await self._emit(LockerEventKind.BOARD_OFFLINE, board.unit, None)

    async def _on_link_down(self, err: DeviceUnavailable) -> None:
        if not self._link_down:
            self._link_down = True
            self._log.warning(
                "locker bus unavailable", endpoint=self.settings.endpoint, error=str(err)
            )
        went_down = [b for b in self._boards.values() if b.online is not False]
        for board in went_down:
            board.online = False
        await self._changed_state()
        for board in went_down:
            await self._emit(LockerEventKind.BOARD_OFFLINE, board.unit, None)

    async def _changed_state(self) -> None:
        up = [bool(b.online) for b in self._boards.values()]
        if all(up):
            self._state.set(DeviceState.ONLINE)
        elif any(up):
            self._state.set(DeviceState.ERROR)
        else:
            self._state.set(DeviceState.OFFLINE)
        async with self._changed:
            self._changed.notify_all()

    async def _emit(self, kind: LockerEventKind, unit: int, compartment: int | None) -> None:
        await self._on_event(LockerEvent(kind, self.settings.id, compartment, unit))
