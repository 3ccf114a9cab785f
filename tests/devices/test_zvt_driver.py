"""ZVT driver against the simulator over pty, socket:// and tcp://: real bytes, real outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pydantic
import pytest
from structlog.testing import capture_logs

from devices.errors import DeviceProtocolError, DeviceRejected, DeviceTimeout, DeviceUnavailable
from devices.sim.zvt_sim import LedgerEntry, ZvtSimulator
from devices.zvt import (
    TerminalBusy,
    TransactionResult,
    ZvtSettings,
    ZvtTerminal,
)
from devices.zvt_codec import Apdu, IntermediateStatus, StatusInfo
from gateway.backoff import Backoff
from gateway.linkstate import DeviceState

FAST: dict[str, Any] = {
    "t1_ms": 100, "t2_s": 0.2, "t3_s": 0.4, "t4_s": 1.0, "status_interval_s": 30,
    "connect_timeout_s": 1,
}  # fmt: skip


class Harness:
    """A running driver plus what its callbacks saw."""

    def __init__(self, term: ZvtTerminal) -> None:
        self.term = term
        self.states: asyncio.Queue[DeviceState] = asyncio.Queue()
        self.intermediate: list[IntermediateStatus] = []
        self.infos: list[StatusInfo] = []
        self.unsolicited: list[StatusInfo] = []
        self.claim_unsolicited = False

    async def wait_state(self, state: DeviceState, timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while await self.states.get() is not state:
                pass

    async def on_intermediate(self, status: IntermediateStatus) -> None:
        self.intermediate.append(status)

    async def on_info(self, info: StatusInfo) -> None:
        self.infos.append(info)

    async def pay(self, amount_minor: int = 1234) -> TransactionResult:
        return await self.term.authorize(
            amount_minor, "EUR", on_status_info=self.on_info, on_intermediate=self.on_intermediate
        )


@asynccontextmanager
async def running(sim: ZvtSimulator, **overrides: Any) -> AsyncIterator[Harness]:
    settings = ZvtSettings(id="pt-1", endpoint=sim.endpoint, **{**FAST, **overrides})
    harness: Harness

    async def unsolicited(info: StatusInfo) -> bool:
        harness.unsolicited.append(info)
        return harness.claim_unsolicited

    term = ZvtTerminal(
        settings,
        on_state=lambda state, _reason: harness.states.put_nowait(state),
        on_unsolicited_status_info=unsolicited,
        backoff=Backoff(initial_s=0.02, max_s=0.1),
    )
    harness = Harness(term)
    async with term, asyncio.TaskGroup() as tg:
        tg.create_task(term.run(), name="zvt-run")
        await harness.wait_state(DeviceState.ONLINE)
        yield harness
        await term.aclose()


@asynccontextmanager
async def simulator(transport: str = "socket") -> AsyncIterator[ZvtSimulator]:
    async with ZvtSimulator(transport, t2_s=0.2, t3_s=0.4) as sim:  # type: ignore[arg-type]
        yield sim


def commands(sim: ZvtSimulator) -> list[bytes]:
    return [a.encode() for a in sim.received if a.cls not in (0x80, 0x84)]


ACK = Apdu(0x80, 0x00)


@pytest.mark.parametrize("transport", ["pty", "socket", "tcp"])
async def test_approved_payment(transport: str) -> None:
    async with simulator(transport) as sim, running(sim) as h:
        result = await h.pay(1234)
        assert result.outcome == "completed"
        assert result.status_info is not None
        assert result.status_info.approved
        assert (result.status_info.amount_minor, result.status_info.receipt_no) == (1234, 1)
        assert result.status_info.masked_pan == "541333******1234"
        assert result.status_info.card_brand == "mastercard"
        assert h.infos == [result.status_info]
        assert [s.step for s in h.intermediate] == [
            "insert_card", "enter_pin", "please_wait", "remove_card",
        ]  # fmt: skip
        assert sim.ledger == [LedgerEntry("authorization", 1, 1, 1234, 0)]
        assert commands(sim)[:2] == [
            bytes.fromhex("06 00 06 00 00 00 08 09 78"),
            bytes.fromhex("06 01 0A 04 00 00 00 00 12 34 49 09 78"),
        ]
        assert h.term.counters.garbage_bytes == h.term.counters.naks_received == 0
    assert commands(sim)[-1] == bytes.fromhex("06 02 00")  # log-off on clean exit


async def test_declined_payment() -> None:
    async with simulator() as sim, running(sim) as h:
        sim.faults.outcome = "decline"
        result = await h.pay()
        assert (result.outcome, result.abort_code) == ("aborted", 0x05)
        assert result.status_info is not None
        assert result.status_info.result_code == 0x05
        assert [(e.result_code, e.receipt_no) for e in sim.ledger] == [(0x05, None)]


@pytest.mark.parametrize("transport", ["socket", "tcp"])
async def test_customer_timeout_or_abort_key(transport: str) -> None:
    async with simulator(transport) as sim, running(sim) as h:
        sim.faults.outcome = "timeout"
        result = await h.pay()
        assert result == TransactionResult("aborted", None, 0x6C)
        assert sim.ledger == []
        assert h.infos == []


@pytest.mark.parametrize("transport", ["pty", "tcp"])
async def test_abort_by_ecr_while_waiting_for_card(transport: str) -> None:
    async with simulator(transport) as sim, running(sim) as h:
        sim.faults.card_delay_s = 5.0
        sim.faults.status_every_s = 0.1
        async with asyncio.TaskGroup() as tg:
            payment = tg.create_task(h.pay())
            await sim.wait_for(lambda: sum(a == ACK for a in sim.received) >= 3)
            assert h.term.busy
            assert await h.term.abort() is True
        assert payment.result() == TransactionResult("aborted", None, 0x6C)
        assert bytes.fromhex("06 B0 00") in commands(sim)
        assert sim.ledger == []
        assert not h.term.busy


async def test_abort_refused_payment_goes_on() -> None:
    async with simulator() as sim, running(sim) as h:
        sim.faults.card_delay_s = 0.4
        sim.faults.refuse_abort = True
        async with asyncio.TaskGroup() as tg:
            payment = tg.create_task(h.pay())
            await sim.wait_for(lambda: sum(a == ACK for a in sim.received) >= 2)
            assert await h.term.abort() is False
        assert payment.result().outcome == "completed"
        assert len(sim.ledger) == 1


async def test_abort_while_idle() -> None:
    async with simulator("tcp") as sim, running(sim) as h:
        assert await h.term.abort() is True
        sim.faults.refuse_abort = True
        assert await h.term.abort() is False


async def test_rejected_command_and_refused_registration() -> None:
    async with simulator() as sim, running(sim) as h:
        sim.faults.reject = 0x6B  # function deactivated
        with pytest.raises(DeviceRejected) as refused:
            await h.pay()
        assert refused.value.code == 0x6B
        assert h.term.state is DeviceState.ONLINE  # a refusal is an answer, not an outage
        await h.term.aclose()  # log-off refused too: run() still ends cleanly
    async with simulator() as sim:
        sim.faults.reject = 0x6B
        settings = ZvtSettings(id="pt-1", endpoint=sim.endpoint, **FAST)
        states: asyncio.Queue[tuple[DeviceState, str | None]] = asyncio.Queue()
        term = ZvtTerminal(
            settings,
            on_state=lambda s, r: states.put_nowait((s, r)),
            backoff=Backoff(initial_s=0.02, max_s=0.05),
        )
        async with term, asyncio.TaskGroup() as tg:
            tg.create_task(term.run())
            state, reason = await states.get()
            assert state is DeviceState.ERROR
            assert reason is not None
            assert "0x6B" in reason
            sim.faults.reject = None
            assert (await states.get())[0] is DeviceState.ONLINE
            await term.aclose()


async def test_slow_card_intermediate_statuses_reset_t4() -> None:
    async with simulator() as sim, running(sim, t4_s=0.4) as h:
        sim.faults.card_delay_s = 1.2
        sim.faults.status_every_s = 0.15
        result = await h.pay()
        assert result.outcome == "completed"
        assert sum(s.step == "insert_card" for s in h.intermediate) >= 5
        assert len(sim.ledger) == 1


async def test_intermediate_status_timeout_byte_sets_t4() -> None:
    async with simulator() as sim, running(sim, t4_s=0.3) as h:
        sim.faults.card_delay_s = 0.8
        sim.faults.status_timeout_min = 1  # "this may take a minute": T4 becomes 60 s
        assert (await h.pay()).outcome == "completed"
        assert h.intermediate[0].timeout_min == 1


async def test_slow_card_without_statuses_hits_t4_then_recovers() -> None:
    async with simulator() as sim, running(sim, t4_s=0.4) as h:
        sim.faults.card_delay_s = 1.0
        with pytest.raises(DeviceTimeout, match="Completion"):
            await h.pay()
        await h.wait_state(DeviceState.OFFLINE)
        await h.wait_state(DeviceState.ONLINE)
        sim.faults.card_delay_s = 0
        assert (await h.pay()).outcome == "completed"


@pytest.mark.parametrize("transport", ["pty", "socket"])
async def test_nak_then_retransmission(transport: str) -> None:
    async with simulator(transport) as sim, running(sim) as h:
        sim.faults.naks = 2
        result = await h.pay()
        assert result.outcome == "completed"
        counters = h.term.counters
        assert (counters.naks_received, counters.retransmissions) == (2, 2)
        assert sum(a.encode() == bytes.fromhex("06 01 0A 04 00 00 00 00 12 34 49 09 78")
                   for a in sim.received) == 1  # fmt: skip


async def test_three_naks_are_a_transport_error() -> None:
    async with simulator() as sim, running(sim) as h:
        sim.faults.naks = 3
        with pytest.raises(DeviceUnavailable, match="not acknowledged") as err:
            await h.pay()
        assert not isinstance(err.value, DeviceTimeout)
        await h.wait_state(DeviceState.OFFLINE)
        await h.wait_state(DeviceState.ONLINE)
        assert sim.ledger == []


async def test_dropped_ack_is_retransmitted() -> None:
    async with simulator() as sim, running(sim) as h:
        sim.faults.drop_acks = 1
        assert (await h.pay()).outcome == "completed"
        assert h.term.counters.retransmissions == 1
        assert len(sim.ledger) == 1


@pytest.mark.parametrize("transport", ["pty", "socket"])
async def test_garbage_is_discarded_and_counted(transport: str) -> None:
    async with simulator(transport) as sim, running(sim) as h:
        sim.faults.garbage = b"\x00\xff\x10\x41\x99"
        result = await h.pay()
        assert result.outcome == "completed"
        assert len(sim.ledger) == 1
        assert h.term.counters.garbage_bytes >= 5 * 5
        sim.faults.garbage = b""
        sim.send_raw(bytes.fromhex("10 02 04 FF"))  # half a frame, then silence: T1 → NAK
        await sim.wait_for(lambda: h.term.counters.naks_sent >= 1)
        assert (await h.term.status_enquiry()).ready


@pytest.mark.parametrize("transport", ["pty", "socket", "tcp"])
async def test_silence_times_out_goes_offline_and_recovers(transport: str) -> None:
    with capture_logs() as logs:
        async with simulator(transport) as sim, running(sim) as h:
            sim.faults.silent = True
            with pytest.raises(DeviceTimeout):
                await h.pay()
            await h.wait_state(DeviceState.OFFLINE)
            assert h.term.state is DeviceState.OFFLINE
            await sim.wait_for(lambda: sim.connections >= 3 if transport == "tcp" else True)
            with pytest.raises(DeviceUnavailable):
                await h.pay()
            sim.faults.silent = False
            await h.wait_state(DeviceState.ONLINE)
            assert (await h.pay()).outcome == "completed"
            assert len(sim.ledger) == 1
    warnings = [e for e in logs if e["log_level"] == "warning" and e["event"] == "zvt.offline"]
    assert len(warnings) == 1  # one warning per outage, not one per retry


@pytest.mark.parametrize("transport", ["socket", "tcp"])
async def test_disconnect_while_waiting_for_card(transport: str) -> None:
    async with simulator(transport) as sim, running(sim) as h:
        sim.faults.disconnect_at = "card"
        with pytest.raises(DeviceUnavailable):
            await h.pay()
        await h.wait_state(DeviceState.OFFLINE)
        await h.wait_state(DeviceState.ONLINE)
        assert sim.ledger == []
        assert (await h.pay()).outcome == "completed"


async def test_disconnect_before_ack_of_status_info_is_not_booked() -> None:
    async with simulator() as sim, running(sim) as h:
        sim.faults.disconnect_at = "status_info"
        with pytest.raises(DeviceUnavailable):
            await h.pay()
        assert sim.ledger == []
        assert [e.trace_no for e in sim.reversed] == [1]


@pytest.mark.parametrize("transport", ["pty", "tcp"])
async def test_commit_point_callback_runs_before_the_ack(transport: str) -> None:
    async with simulator(transport) as sim, running(sim) as h:
        seen: list[tuple[int, int]] = []

        async def commit(info: StatusInfo) -> None:
            await asyncio.sleep(0.1)  # a slow database commit: the terminal must still wait
            start = next(i for i, a in enumerate(sim.received) if a.instr == 0x01)
            seen.append((len(sim.ledger), sum(a == ACK for a in sim.received[start:])))

        result = await h.term.authorize(500, "EUR", on_status_info=commit)
        assert result.outcome == "completed"
        # only 04 FF 0A, 04 FF 01, 04 FF 0E were acknowledged during the callback; nothing booked
        assert seen == [(0, 3)]
        assert len(sim.ledger) == 1


async def test_commit_point_callback_raising_means_no_ack_and_no_booking() -> None:
    async with simulator() as sim, running(sim) as h:

        async def failing_commit(info: StatusInfo) -> None:
            raise RuntimeError("database down")

        with pytest.raises(RuntimeError, match="database down"):
            await h.term.authorize(500, "EUR", on_status_info=failing_commit)
        await sim.wait_for(lambda: bool(sim.reversed))
        assert sim.ledger == []
        assert [e.amount_minor for e in sim.reversed] == [500]
        assert h.unsolicited == []
        assert not h.term.busy
        assert (await h.pay()).outcome == "completed"


async def test_completion_lost_after_the_ack_is_outcome_timeout_and_booked() -> None:
    async with simulator("tcp") as sim, running(sim) as h:
        sim.faults.disconnect_at = "completion"
        result = await h.pay(990)
        assert result.outcome == "timeout"
        assert result.status_info is not None
        assert result.status_info.amount_minor == 990
        assert [e.amount_minor for e in sim.ledger] == [990]
        await h.wait_state(DeviceState.OFFLINE)
        await h.wait_state(DeviceState.ONLINE)


async def test_malformed_status_info_is_a_protocol_error_and_not_acknowledged() -> None:
    async with simulator() as sim, running(sim) as h:
        sim.faults.bad_status_info = True
        with pytest.raises(DeviceProtocolError, match="7F"):
            await h.pay()
        await sim.wait_for(lambda: bool(sim.reversed))
        assert sim.ledger == []
        assert h.infos == []
        assert h.term.counters.protocol_errors == 1
        assert (await h.pay()).outcome == "completed"


async def test_unsolicited_status_info_is_acknowledged_only_when_claimed() -> None:
    async with simulator() as sim, running(sim) as h:
        assert await sim.push_status_info(700) is False
        assert [i.amount_minor for i in h.unsolicited] == [700]
        assert sim.ledger == []
        assert len(sim.reversed) == 1
        h.claim_unsolicited = True
        assert await sim.push_status_info(800) is True
        assert [e.amount_minor for e in sim.ledger] == [800]
        assert h.term.state is DeviceState.ONLINE


async def test_repeat_receipt_returns_the_last_transaction() -> None:
    async with simulator("tcp") as sim, running(sim) as h:
        nothing_yet = await h.term.repeat_receipt()
        assert nothing_yet == TransactionResult("aborted", None, 0x83)
        paid = await h.pay(4200)
        repeated = await h.term.repeat_receipt(on_status_info=h.on_info)
        assert repeated.outcome == "completed"
        assert repeated.status_info == paid.status_info
        assert len(sim.ledger) == 1
        assert bytes.fromhex("06 20 05 00 00 00 03 01") in commands(sim)


async def test_status_enquiry() -> None:
    async with simulator("pty") as sim, running(sim) as h:
        status = await h.term.status_enquiry()
        assert (status.status_code, status.sw_version, status.ready) == (0, "SIM-ZVT 1.0", True)
        assert bytes.fromhex("05 01 03 00 00 00") in commands(sim)


async def test_periodic_health_check() -> None:
    async with simulator() as sim, running(sim, status_interval_s=0.1):
        await sim.wait_for(lambda: commands(sim).count(bytes.fromhex("05 01 03 00 00 00")) >= 2)


async def test_end_of_day_and_reversal() -> None:
    async with simulator() as sim, running(sim) as h:
        first = await h.pay(1000)
        await h.pay(250)
        assert first.status_info is not None
        assert first.status_info.receipt_no is not None
        reversed_ = await h.term.reversal(first.status_info.receipt_no, on_status_info=h.on_info)
        assert reversed_.outcome == "completed"
        assert sim.ledger[-1].reversal_of == first.status_info.receipt_no
        again = await h.term.reversal(first.status_info.receipt_no, on_status_info=h.on_info)
        assert (again.outcome, again.abort_code) == ("aborted", 0xB4)
        eod = await h.term.end_of_day()
        assert eod.outcome == "completed"
        assert eod.status_info is not None
        assert eod.status_info.amount_minor == 250
        assert bytes.fromhex("06 50 03 00 00 00") in commands(sim)


async def test_second_operation_while_busy_is_refused() -> None:
    async with simulator() as sim, running(sim) as h:
        sim.faults.card_delay_s = 0.3
        async with asyncio.TaskGroup() as tg:
            payment = tg.create_task(h.pay())
            await sim.wait_for(lambda: h.term.busy)
            with pytest.raises(TerminalBusy):
                await h.pay()
            with pytest.raises(TerminalBusy):
                await h.term.status_enquiry()
        assert payment.result().outcome == "completed"
        assert len(sim.ledger) == 1


async def test_unmasked_pan_never_leaves_the_driver() -> None:
    with capture_logs() as logs:
        async with simulator() as sim, running(sim) as h:
            sim.faults.unmasked_pan = True
            result = await h.pay()
    assert result.status_info is not None
    assert result.status_info.masked_pan == "************1234"
    assert "5413330089681234" not in repr(result) + repr(logs) + repr(h.infos)


async def test_operations_while_offline_fail_fast() -> None:
    settings = ZvtSettings(id="pt-1", endpoint="socket://127.0.0.1:9", **FAST)
    term = ZvtTerminal(settings)
    with pytest.raises(DeviceUnavailable, match="offline"):
        await term.authorize(100, "EUR", on_status_info=Harness(term).on_info)
    with pytest.raises(ValueError, match="currency"):
        await term.authorize(100, "XYZ", on_status_info=Harness(term).on_info)


async def test_cancelled_run_sends_log_off_best_effort() -> None:
    async with simulator() as sim:
        settings = ZvtSettings(id="pt-1", endpoint=sim.endpoint, **FAST)
        states: list[DeviceState] = []
        term = ZvtTerminal(settings, on_state=lambda s, _r: states.append(s))
        task = asyncio.create_task(term.run())
        await sim.wait_for(lambda: any(a.cls == 0x06 and a.instr == 0x00 for a in sim.received))
        await sim.wait_for(lambda: ACK in sim.received)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sim.wait_for(lambda: bytes.fromhex("06 02 00") in commands(sim))


def test_settings_validation_and_schema() -> None:
    base = {"id": "pt-1", "endpoint": "/dev/ttyUSB0"}
    settings = ZvtSettings.model_validate(base)
    assert (settings.password, settings.currency, settings.config_byte) == ("000000", "EUR", 8)
    assert (settings.t1_ms, settings.t2_s, settings.t3_s, settings.t4_s) == (200, 5, 5, 180)
    for bad in (
        {"id": "bad id!"},
        {"endpoint": "COM3"},
        {"currency": "XYZ"},
        {"password": "12345"},
        {"t2_s": 0},
    ):
        with pytest.raises(pydantic.ValidationError):
            ZvtSettings.model_validate({**base, **bad})
    with pytest.raises(pydantic.ValidationError, match="supported: EUR, CHF"):
        ZvtSettings.model_validate({**base, "currency": "JPY"})
    schema = ZvtSettings.model_json_schema()
    assert all("description" in prop for prop in schema["properties"].values())
    with pytest.raises(pydantic.ValidationError):
        settings.password = "123456"  # type: ignore[misc]
