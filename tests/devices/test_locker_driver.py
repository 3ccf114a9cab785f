"""LockerBank against the simulated boards over a pty and socket://, with tiny timings."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pydantic
import pytest
from structlog.testing import capture_logs

from devices import modbus_rtu as rtu
from devices.errors import DeviceRejected, DeviceUnavailable
from devices.locker import (
    CompartmentSettings,
    LockerBank,
    LockerBankSettings,
    LockerEvent,
    LockerEventKind,
)
from devices.sim.locker_sim import LockerBoardSim
from gateway.backoff import Backoff
from gateway.linkstate import DeviceState

K = LockerEventKind
# compartment number -> (unit, channel): two boards on one bus
WIRING = {1: (1, 0), 2: (1, 1), 3: (2, 0), 4: (2, 5)}


def make_settings(endpoint: str, **overrides: Any) -> LockerBankSettings:
    fields: dict[str, Any] = {
        "id": "bank-A",
        "endpoint": endpoint,
        "compartments": [
            {"number": n, "size": "M", "unit": u, "channel": ch} for n, (u, ch) in WIRING.items()
        ],
        "poll_ms": 20,
        "response_timeout_ms": 40,
        "open_confirm_s": 0.25,
        "door_left_open_s": 0.3,
        "forced_open_window_s": 0.5,
    }
    fields.update(overrides)
    return LockerBankSettings.model_validate(fields)


class Recorder:
    """The bank's event callback: keeps every event and lets a test await one."""

    def __init__(self) -> None:
        self.events: list[LockerEvent] = []
        self._changed = asyncio.Condition()

    async def __call__(self, event: LockerEvent) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def of(self, kind: LockerEventKind, compartment: int | None = None) -> list[LockerEvent]:
        """Events of one kind (and compartment, when given)."""
        return [
            e
            for e in self.events
            if e.kind is kind and (compartment is None or e.compartment == compartment)
        ]

    async def wait_for(
        self, kind: LockerEventKind, compartment: int | None = None, *, count: int = 1
    ) -> LockerEvent:
        """The ``count``-th event of this kind; fails the test after 3 s."""
        async with asyncio.timeout(3), self._changed:
            await self._changed.wait_for(lambda: len(self.of(kind, compartment)) >= count)
        return self.of(kind, compartment)[count - 1]


class FakeClock:
    """A monotonic clock that tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(bank: LockerBank) -> DeviceState:
    """Read the state afresh (keeps mypy from narrowing the property across awaits)."""
    return bank.state


def fast_backoff() -> Backoff:
    return Backoff(initial_s=0.02, max_s=0.1)


@contextlib.asynccontextmanager
async def running(
    settings: LockerBankSettings, **kwargs: Any
) -> AsyncIterator[tuple[LockerBank, Recorder]]:
    """A started bank with its supervision loop in a TaskGroup, every board seen online."""
    recorder = Recorder()
    kwargs.setdefault("backoff_factory", fast_backoff)
    async with LockerBank(settings, recorder, **kwargs) as bank, asyncio.TaskGroup() as tg:
        task = tg.create_task(bank.run(), name="locker-bank")
        try:
            async with asyncio.timeout(3):
                for number in (1, 3):  # one compartment per board
                    assert await bank.wait_closed(number, 3)
            yield bank, recorder
        finally:
            task.cancel()


def pulse_frames(sim: LockerBoardSim, unit: int) -> list[bytes]:
    return [
        r.raw
        for r in sim.requests_for(unit, rtu.WRITE_SINGLE_COIL)
        if r.raw[2:4] != rtu.ALL_RELAYS_ADDRESS.to_bytes(2, "big")
    ]


def all_off_count(sim: LockerBoardSim, unit: int) -> int:
    return sum(r.raw == rtu.all_relays_off(unit) for r in sim.requests_for(unit))


@pytest.fixture(params=["pty", "tcp"])
async def sim(request: pytest.FixtureRequest) -> AsyncIterator[LockerBoardSim]:
    async with LockerBoardSim([1, 2], transport=request.param) as board_sim:
        yield board_sim


# -- settings -----------------------------------------------------------------------------------


def test_settings_defaults_and_schema_descriptions() -> None:
    settings = LockerBankSettings.model_validate(
        {
            "id": "A",
            "endpoint": "/dev/ttyUSB0",
            "compartments": [{"number": 1, "size": "S", "unit": 1, "channel": 0}],
            "unknown_key": "ignored",
        }
    )
    assert (settings.baudrate, settings.poll_ms, settings.pulse_ms) == (9600, 250, 700)
    assert (settings.door_closed_when, settings.door_left_open_s) == (1, 120.0)
    assert (settings.response_timeout_ms, settings.retries, settings.jam_tries) == (300, 2, 3)
    assert settings.forced_open_window_s == 2.0
    with pytest.raises(pydantic.ValidationError):
        settings.poll_ms = 5
    for model in (LockerBankSettings, CompartmentSettings):
        schema = model.model_json_schema()
        assert all(p.get("description") for p in schema["properties"].values()), model


@pytest.mark.parametrize(
    "overrides",
    [
        {"endpoint": "tcp://10.0.0.5:20007"},
        {"endpoint": "COM3"},
        {"id": "bank A"},
        {"pulse_ms": 750},
        {"pulse_ms": 25_600},
        {"door_closed_when": 2},
        {"compartments": []},
        {"compartments": [{"number": 1, "size": "S", "unit": 1, "channel": 0}] * 2},
        {
            "compartments": [
                {"number": 1, "size": "S", "unit": 1, "channel": 0},
                {"number": 2, "size": "S", "unit": 1, "channel": 0},
            ]
        },
        {"compartments": [{"number": 1, "size": "XL", "unit": 1, "channel": 0}]},
        {"compartments": [{"number": 1, "size": "S", "unit": 248, "channel": 0}]},
        {"compartments": [{"number": 1, "size": "S", "unit": 1, "channel": 8}]},
    ],
)
def test_settings_reject(overrides: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        make_settings(**{"endpoint": "socket://127.0.0.1:5020", **overrides})


# -- doors --------------------------------------------------------------------------------------


async def test_pulse_opens_door_and_close_is_detected(sim: LockerBoardSim) -> None:
    async with running(make_settings(sim.endpoint, pulse_ms=800)) as (bank, events):
        assert state(bank) is DeviceState.ONLINE
        assert bank.online
        assert all_off_count(sim, 1) == 1
        assert all_off_count(sim, 2) == 1
        assert bank.door_open(2) is False

        assert await bank.open_compartment(2)
        assert bank.door_open(2) is True
        assert pulse_frames(sim, 1) == [bytes.fromhex("01 05 02 01 00 08 9C 74")]  # devices.md
        assert sim.pulse_count(1, 1) == 1
        await events.wait_for(K.OPENED, 2)

        assert not await bank.wait_closed(2, 0.05)
        sim.close_door(1, 1)
        assert await bank.wait_closed(2, 1)
        await events.wait_for(K.CLOSED, 2)
        assert [e.kind for e in events.events] == [K.OPENED, K.CLOSED]
        assert events.events[0] == LockerEvent(K.OPENED, "bank-A", 2, 1)


async def test_open_on_already_open_door_sends_no_pulse(sim: LockerBoardSim) -> None:
    async with running(make_settings(sim.endpoint)) as (bank, _events):
        assert await bank.open_compartment(4)
        assert await bank.open_compartment(4)
        assert sim.pulse_count(2, 5) == 1


async def test_forced_open(sim: LockerBoardSim) -> None:
    async with running(make_settings(sim.endpoint)) as (_bank, events):
        sim.force_open(2, 5)
        forced = await events.wait_for(K.FORCED_OPEN, 4)
        assert forced.is_alert
        assert (forced.bank, forced.unit) == ("bank-A", 2)
        assert [e.kind for e in events.events] == [K.OPENED, K.FORCED_OPEN]
        assert pulse_frames(sim, 2) == []


async def test_door_left_open_after_a_pulse(sim: LockerBoardSim) -> None:
    async with running(make_settings(sim.endpoint, door_left_open_s=0.2)) as (bank, events):
        assert await bank.open_compartment(1)
        left = await events.wait_for(K.DOOR_LEFT_OPEN, 1)
        assert left.unit == 1
        await asyncio.sleep(0.1)  # more polls with the door still open: no second alert
        assert len(events.of(K.DOOR_LEFT_OPEN)) == 1
        assert not events.of(K.FORCED_OPEN)


async def test_door_left_open_uses_the_injected_clock() -> None:
    clock = FakeClock()
    async with LockerBoardSim([1, 2]) as sim:
        settings = make_settings(sim.endpoint, door_left_open_s=120)
        async with running(settings, clock=clock) as (bank, events):
            assert await bank.open_compartment(3)
            sim.close_door(2, 0)
            assert await bank.wait_closed(3, 1)
            assert await bank.open_compartment(3)
            clock.now += 119
            await asyncio.sleep(0.1)
            assert not events.of(K.DOOR_LEFT_OPEN)
            clock.now += 2
            await events.wait_for(K.DOOR_LEFT_OPEN, 3)
            # past the forced-open window now: an unpulsed opening elsewhere is forced
            sim.force_open(1, 0)
            await events.wait_for(K.FORCED_OPEN, 1)


async def test_jammed_after_three_pulses(sim: LockerBoardSim) -> None:
    sim.jam(1, 0)
    audit: list[tuple[int, int]] = []

    async def before_pulse(try_no: int) -> None:
        audit.append((try_no, sim.pulse_count(1, 0)))

    async with running(make_settings(sim.endpoint, open_confirm_s=0.1)) as (bank, events):
        assert not await bank.open_compartment(1, before_pulse=before_pulse)
        assert sim.pulse_count(1, 0) == 3
        assert pulse_frames(sim, 1) == [bytes.fromhex("01 05 02 00 00 07 8D B0")] * 3
        assert audit == [(1, 0), (2, 1), (3, 2)]  # each hook ran before its pulse was sent
        jammed = await events.wait_for(K.JAMMED, 1)
        assert jammed.is_alert
        assert bank.door_open(1) is False
        assert not events.of(K.OPENED)


async def test_refused_pulse_raises_rejected_and_board_stays_online(sim: LockerBoardSim) -> None:
    sim.reject_pulses(2, code=0x02)
    async with running(make_settings(sim.endpoint)) as (bank, events):
        with pytest.raises(DeviceRejected) as info:
            await bank.open_compartment(4)
        assert info.value.code == 0x02
        assert bank.counters.exceptions == 1
        assert sim.pulse_count(2, 5) == 0
        assert state(bank) is DeviceState.ONLINE
        assert not events.events


async def test_polarity_door_closed_when_zero() -> None:
    sim = LockerBoardSim([1, 2], door_closed_when=0)
    async with sim, running(make_settings(sim.endpoint, door_closed_when=0)) as (bank, events):
        assert bank.door_open(1) is False  # every input reads 0 here: closed doors
        sim.force_open(1, 0)
        await events.wait_for(K.FORCED_OPEN, 1)
        assert bank.door_open(1) is True


async def test_unknown_compartment_is_a_value_error(sim: LockerBoardSim) -> None:
    async with running(make_settings(sim.endpoint)) as (bank, _events):
        with pytest.raises(ValueError, match="no compartment 9"):
            await bank.pulse(9)
        with pytest.raises(ValueError, match="no compartment 9"):
            bank.door_open(9)


# -- boards and the bus --------------------------------------------------------------------------


async def test_silent_board_goes_offline_and_recovers(sim: LockerBoardSim) -> None:
    with capture_logs() as logs:
        async with running(make_settings(sim.endpoint)) as (bank, events):
            sim.silence(2)
            offline = await events.wait_for(K.BOARD_OFFLINE)
            assert (offline.unit, offline.compartment) == (2, None)
            assert state(bank) is DeviceState.ERROR
            assert not bank.online
            assert not bank.board_online(2)
            assert bank.board_online(1)
            assert bank.door_open(3) is None
            assert bank.door_open(1) is False
            with pytest.raises(DeviceUnavailable):
                await bank.pulse(3)
            assert sim.pulse_count(2, 0) == 0
            probes = all_off_count(sim, 2)
            await asyncio.sleep(0.3)  # several backoff retries while silent
            assert all_off_count(sim, 2) > probes

            sim.silence(2, on=False)
            await events.wait_for(K.BOARD_ONLINE)
            assert state(bank) is DeviceState.ONLINE
            answered_off = [
                r for r in sim.requests_for(2) if r.answered and r.raw == rtu.all_relays_off(2)
            ]
            assert len(answered_off) == 2  # at start-up and on recovery
            assert bank.door_open(3) is False
            assert await bank.open_compartment(3)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [w["event"] for w in warnings] == ["locker board offline"]
    assert warnings[0]["bank"] == "bank-A"
    assert bank.counters.timeouts >= 3
    assert [e.kind for e in events.events if e.is_alert] == [K.BOARD_OFFLINE, K.BOARD_ONLINE]


async def test_recovered_board_gets_all_relays_off_before_polls() -> None:
    sim = LockerBoardSim([1, 2])
    async with sim, running(make_settings(sim.endpoint)) as (_bank, events):
        sim.silence(1)
        await events.wait_for(K.BOARD_OFFLINE)
        mark = len(sim.requests)
        sim.silence(1, on=False)
        await events.wait_for(K.BOARD_ONLINE)
        first_answered = next(r for r in sim.requests[mark:] if r.unit == 1 and r.answered)
        assert first_answered.raw == bytes.fromhex("01 05 00 FF 00 00 FD FA")


async def test_unplugged_bus_takes_every_board_offline_and_back() -> None:
    async with LockerBoardSim([1, 2], transport="tcp") as sim:
        with capture_logs() as logs:
            async with running(make_settings(sim.endpoint)) as (bank, events):
                await sim.unplug()
                await events.wait_for(K.BOARD_OFFLINE, count=2)
                assert state(bank) is DeviceState.OFFLINE
                with pytest.raises(DeviceUnavailable):
                    await bank.open_compartment(1)
                await asyncio.sleep(0.2)  # reconnect attempts against a closed port
                await sim.replug()
                await events.wait_for(K.BOARD_ONLINE, count=2)
                assert state(bank) is DeviceState.ONLINE
                assert all_off_count(sim, 1) == 2
                assert all_off_count(sim, 2) == 2
                assert await bank.open_compartment(1)
        warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
        assert warnings == ["locker bus unavailable"]
        assert {e.unit for e in events.of(K.BOARD_OFFLINE)} == {1, 2}


async def test_two_boards_on_one_bus_are_serialised() -> None:
    async with LockerBoardSim([1, 2], reply_delay_s=0.004) as sim:
        async with running(make_settings(sim.endpoint)) as (bank, _events):
            async with asyncio.TaskGroup() as tg:
                opened = [tg.create_task(bank.open_compartment(n)) for n in (1, 2, 3, 4)]
            assert all(t.result() for t in opened)
            assert [sim.pulse_count(u, ch) for u, ch in WIRING.values()] == [1, 1, 1, 1]
        assert sim.collisions == 0
        assert sim.min_gap_s is not None
        assert sim.min_gap_s >= rtu.inter_frame_gap_s(9600)


async def test_garbage_is_counted_and_the_bank_stays_online(sim: LockerBoardSim) -> None:
    async with running(make_settings(sim.endpoint)) as (bank, events):
        for _ in range(5):
            sim.inject_garbage(b"\x01\x02\xee\x13\x37\x00\xff")
            await asyncio.sleep(0.03)
        sim.inject_garbage(rtu.encode(1, 0x02, b"\x01\x00")[:-1] + b"\x00")  # bad CRC
        assert await bank.open_compartment(2)
        counters = bank.counters
        assert counters.garbage_bytes > 0
        assert counters.crc_errors > 0
        assert not events.of(K.BOARD_OFFLINE)
        assert state(bank) is DeviceState.ONLINE
        await events.wait_for(K.OPENED, 2)
