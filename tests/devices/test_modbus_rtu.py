"""Modbus RTU codec (reference bytes of devices.md), decoder resync and fuzz, and the bus."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices import modbus_rtu as rtu
from devices.errors import DeviceProtocolError, DeviceRejected, DeviceTimeout, DeviceUnavailable
from devices.sim.locker_sim import LockerBoardSim

INPUTS_CH2_OPEN = bytes.fromhex("01 02 01 FB E0 0B")


def test_crc_check_value() -> None:
    assert rtu.crc16(b"123456789") == 0x4B37


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (rtu.pulse(1, 0, 7), "01 05 02 00 00 07 8D B0"),
        (rtu.pulse(1, 1, 8), "01 05 02 01 00 08 9C 74"),
        (rtu.all_relays_off(1), "01 05 00 FF 00 00 FD FA"),
        (rtu.read_discrete_inputs(1), "01 02 00 00 00 08 79 CC"),
        (rtu.encode(1, 0x02, bytes.fromhex("01 FB")), "01 02 01 FB E0 0B"),
    ],
    ids=["pulse-ch0-700ms", "pulse-ch1-800ms", "all-off", "read-inputs", "reply-ch2-open"],
)
def test_reference_frames(frame: bytes, expected: str) -> None:
    assert frame == bytes.fromhex(expected)


def test_read_coils_frame() -> None:
    frame = rtu.read_coils(1)
    assert frame[:6] == bytes.fromhex("01 01 00 00 00 08")
    assert rtu.crc16(frame[:-2]).to_bytes(2, "little") == frame[-2:]


def test_reference_reply_decodes_to_door_bits() -> None:
    (frame,) = rtu.FrameDecoder().feed(INPUTS_CH2_OPEN)
    assert (frame.unit, frame.function) == (1, rtu.READ_DISCRETE_INPUTS)
    bits = rtu.decode_bits(frame, 8)
    assert [ch for ch, closed in enumerate(bits) if not closed] == [2]


@pytest.mark.parametrize(
    "call",
    [lambda: rtu.pulse(1, 8, 7), lambda: rtu.pulse(1, 0, 0), lambda: rtu.pulse(248, 0, 7)],
)
def test_builders_refuse_out_of_range(call: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by argument
        call()  # type: ignore[operator]


def test_decode_bits_rejects_wrong_byte_count() -> None:
    with pytest.raises(DeviceProtocolError):
        rtu.decode_bits(rtu.Frame(1, 2, bytes.fromhex("02 FF FF")), 8)


def test_exception_reply_is_decoded() -> None:
    (frame,) = rtu.FrameDecoder().feed(rtu.encode(3, 0x85, b"\x02"))
    assert frame.is_exception
    assert frame.exception_code == 2
    assert frame.unit == 3


def test_reply_split_byte_by_byte() -> None:
    decoder = rtu.FrameDecoder()
    stream = INPUTS_CH2_OPEN + rtu.pulse(1, 0, 7)
    frames = [f for byte in stream for f in decoder.feed(bytes([byte]))]
    assert [f.encode() for f in frames] == [INPUTS_CH2_OPEN, rtu.pulse(1, 0, 7)]
    assert decoder.garbage_bytes == 0
    assert decoder.pending == 0


def test_garbage_before_frame_is_counted_and_skipped() -> None:
    decoder = rtu.FrameDecoder()
    frames = decoder.feed(b"\x00\xff\x13\x37" + INPUTS_CH2_OPEN)
    assert [f.encode() for f in frames] == [INPUTS_CH2_OPEN]
    assert decoder.garbage_bytes == 4


def test_bad_crc_is_counted_and_decoder_resyncs() -> None:
    decoder = rtu.FrameDecoder()
    corrupted = INPUTS_CH2_OPEN[:-1] + b"\x00"
    frames = decoder.feed(corrupted + INPUTS_CH2_OPEN)
    assert [f.encode() for f in frames] == [INPUTS_CH2_OPEN]
    assert decoder.crc_errors >= 1
    assert decoder.garbage_bytes == len(corrupted)


def test_fake_long_header_does_not_swallow_the_next_frame() -> None:
    # "01 03 F0" announces 240 data bytes; the valid frame after it proves it was noise.
    decoder = rtu.FrameDecoder()
    frames = decoder.feed(bytes.fromhex("01 03 F0") + INPUTS_CH2_OPEN)
    assert [f.encode() for f in frames] == [INPUTS_CH2_OPEN]
    assert decoder.garbage_bytes == 3


def test_request_decoder_frames_requests() -> None:
    decoder = rtu.FrameDecoder(rtu.request_length)
    stream = rtu.read_discrete_inputs(2) + b"\xaa" + rtu.pulse(1, 1, 8)
    assert [f.encode() for f in decoder.feed(stream)] == [
        rtu.read_discrete_inputs(2),
        rtu.pulse(1, 1, 8),
    ]


def test_inter_frame_gap() -> None:
    assert rtu.inter_frame_gap_s(9600) == pytest.approx(0.00401, abs=1e-5)
    assert rtu.inter_frame_gap_s(115200) == 0.00175


@settings(max_examples=300, deadline=500)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8))
def test_decoder_fuzz_never_crashes(data: bytes, cuts: list[int]) -> None:
    decoder = rtu.FrameDecoder()
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    for lo, hi in itertools.pairwise(bounds):
        for frame in decoder.feed(data[lo:hi]):
            assert rtu.crc16(frame.encode()) == 0  # a CRC-appended frame checks to zero
            try:
                if frame.is_exception:
                    frame.exception_code  # noqa: B018 - decoding is the test
                elif frame.function in (1, 2):
                    rtu.decode_bits(frame, 8)
            except DeviceProtocolError:
                pass
    assert decoder.pending <= 256


@settings(max_examples=200, deadline=500)
@given(garbage=st.binary(max_size=40), unit=st.integers(1, 247), level=st.integers(0, 255))
def test_decoder_recovers_valid_frame_after_garbage(garbage: bytes, unit: int, level: int) -> None:
    reply = rtu.encode(unit, 0x02, bytes((1, level)))
    decoder = rtu.FrameDecoder()
    frames = decoder.feed(garbage + reply)
    assert frames
    assert frames[-1].encode() == reply


# -- the bus against the simulator ---------------------------------------------------------------


@pytest.fixture(params=["pty", "tcp"])
async def sim(request: pytest.FixtureRequest) -> object:
    async with LockerBoardSim([1, 2], transport=request.param) as board_sim:
        yield board_sim


async def test_bus_reads_pulses_and_records_exact_frames(sim: LockerBoardSim) -> None:
    async with rtu.ModbusRtuBus(sim.endpoint, response_timeout_s=0.1) as bus:
        assert await bus.read_discrete_inputs(1) == (True,) * 8
        await bus.pulse(1, 0, 7)
        assert sim.door_is_open(1, 0)
        assert (await bus.read_coils(1))[0] is True
        assert sim.requests[1].raw == bytes.fromhex("01 05 02 00 00 07 8D B0")


async def test_bus_exception_reply_raises_rejected_with_code(sim: LockerBoardSim) -> None:
    async with rtu.ModbusRtuBus(sim.endpoint, response_timeout_s=0.1) as bus:
        with pytest.raises(DeviceRejected) as info:
            await bus.transact(rtu.write_single_coil(1, 0x0300, 0))
        assert info.value.code == 0x02
        with pytest.raises(DeviceRejected) as info:
            await bus.transact(rtu.encode(1, 0x03, bytes(4)))
        assert info.value.code == 0x01
        assert bus.counters.exceptions == 2


async def test_bus_silent_unit_times_out_after_retries(sim: LockerBoardSim) -> None:
    sim.silence(2)
    async with rtu.ModbusRtuBus(sim.endpoint, response_timeout_s=0.03, retries=2) as bus:
        with pytest.raises(DeviceTimeout):
            await bus.read_discrete_inputs(2)
        assert len(sim.requests_for(2)) == 3
        assert bus.counters.timeouts == 3
        assert await bus.read_discrete_inputs(1) == (True,) * 8


async def test_bus_garbage_is_counted_and_next_reply_read(sim: LockerBoardSim) -> None:
    async with rtu.ModbusRtuBus(sim.endpoint, response_timeout_s=0.1) as bus:
        await bus.read_discrete_inputs(1)
        sim.inject_garbage(b"\x55\x01\x02\xf0\x00")
        sim.force_open(1, 3)
        bits = await bus.read_discrete_inputs(1)
        assert bits[3] is False
        assert bus.counters.garbage_bytes >= 5


async def test_bus_requests_keep_the_inter_frame_gap(sim: LockerBoardSim) -> None:
    async with rtu.ModbusRtuBus(sim.endpoint, response_timeout_s=0.1) as bus:
        for _ in range(10):
            await bus.read_discrete_inputs(1)
            await bus.read_discrete_inputs(2)
    assert sim.min_gap_s is not None
    assert sim.min_gap_s >= rtu.inter_frame_gap_s(9600)


async def test_bus_concurrent_requests_never_collide() -> None:
    async with LockerBoardSim([1, 2], reply_delay_s=0.005) as sim:
        async with (
            rtu.ModbusRtuBus(sim.endpoint, response_timeout_s=0.1) as bus,
            asyncio.TaskGroup() as tg,
        ):
            for i in range(8):
                tg.create_task(bus.read_discrete_inputs(1 + i % 2))
                tg.create_task(bus.pulse(1 + i % 2, i, 1))
        assert sim.collisions == 0
        assert len(sim.requests) == 16
        assert sum(sim.pulse_count(1 + i % 2, i) for i in range(8)) == 8


async def test_bus_link_loss_raises_unavailable_then_reconnects() -> None:
    async with LockerBoardSim([1], transport="tcp") as sim:
        bus = rtu.ModbusRtuBus(sim.endpoint, response_timeout_s=0.1)
        async with bus:
            await bus.read_discrete_inputs(1)
            await sim.unplug()
            with pytest.raises(DeviceUnavailable):
                await bus.read_discrete_inputs(1)  # the open connection is closed under us
            with pytest.raises(DeviceUnavailable):
                await bus.read_discrete_inputs(1)  # and nobody is listening any more
            assert not bus.connected
            await sim.replug()
            assert await bus.read_discrete_inputs(1) == (True,) * 8


async def test_bus_never_resends_a_pulse_whose_reply_was_lost() -> None:
    """A resent pulse would open the lock again without its audit record."""
    async with (
        LockerBoardSim([1], reply_delay_s=0.12) as sim,
        rtu.ModbusRtuBus(sim.endpoint, response_timeout_s=0.05, retries=2) as bus,
    ):
        with pytest.raises(DeviceTimeout):
            await bus.pulse(1, 0, 7)
        await asyncio.sleep(0.3)  # let the late reply arrive and be discarded
        assert sim.pulse_count(1, 0) == 1
        assert len(sim.requests_for(1, 0x05)) == 1
