"""Establishing a payment's outcome after the link to its terminal was lost or the gateway
restarted (devices.md "Recovery"). Nothing here authorizes: it waits, listens and asks.

- ``authorizing`` (no 04 0F acknowledged): ``failed`` once the terminal is idle again (answers
  Registration), ``in_doubt`` if it is not within T4; if its 04 0F arrives meanwhile and is
  claimed, that 04 0F decides.
- ``confirming`` (our 04 0F committed, its acknowledgement uncertain): Repeat Receipt; our
  trace/receipt number → its result decides, an older transaction → ``failed``, anything else →
  ``in_doubt`` (asked again when the terminal comes back).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from devices.errors import DeviceError
from gateway.linkstate import DeviceState
from gateway.payment_records import Final, Payment, Problem, final_of_receipt, final_of_repeat
from gateway.payment_terminal import Terminal

log = structlog.get_logger(__name__)

Phase = Literal["terminal", "recovering", "done"]

_NOT_BOOKED = Problem("not-booked", "the terminal did not book it")


@dataclass(slots=True, eq=False)
class Run:
    """A payment being worked on: ``terminal`` (in an exchange) or ``recovering``.

    Its POS answer resolves ``done``; ``claimed_gen`` is the terminal's online generation when
    an unsolicited 04 0F was claimed for it.
    """

    payment: Payment
    done: asyncio.Future[dict[str, Any]]
    phase: Phase = "terminal"
    claimed_gen: int | None = None
    statuses: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    relayed: asyncio.Event = field(default_factory=asyncio.Event)


async def settle(run: Run, term: Terminal, after_gen: int) -> Final:
    """The outcome of a payment whose exchange broke off (generation ``after_gen`` was current)."""
    if run.payment.receipt is None:
        return await _settle_authorizing(run, term, after_gen)
    return await ask_terminal(run.payment, term, after_gen)


async def _settle_authorizing(run: Run, term: Terminal, after_gen: int) -> Final:
    idle = await term.wait_until(
        lambda: run.claimed_gen is not None or term.online_after(after_gen), term.settings.t4_s
    )
    if run.claimed_gen is not None:
        return await _settle_claimed(run, term, run.claimed_gen)
    if idle:
        return Final("failed", error=_NOT_BOOKED)
    problem = Problem("terminal-unreachable", "the terminal did not become idle within T4")
    return Final("in_doubt", error=problem, recheck=True)


async def _settle_claimed(run: Run, term: Terminal, gen: int) -> Final:
    """A claimed 04 0F decides, unless the link broke right after it (the ack may be lost)."""
    link_broke = await term.wait_until(
        lambda: term.online_gen != gen or term.driver.state is not DeviceState.ONLINE,
        term.settings.t3_s,
    )
    receipt = run.payment.receipt
    if link_broke or receipt is None:
        return await ask_terminal(run.payment, term, gen)
    return final_of_receipt(receipt)


async def ask_terminal(payment: Payment, term: Terminal, after_gen: int) -> Final:
    """Wait (≤ T4) until the terminal is online after ``after_gen``, then :func:`repeat`."""
    if not await term.wait_until(lambda: term.online_after(after_gen), term.settings.t4_s):
        problem = Problem("terminal-unreachable", "the terminal did not come back within T4")
        return Final("in_doubt", error=problem, recheck=True)
    return await repeat(payment, term)


async def repeat(payment: Payment, term: Terminal) -> Final:
    """Judge a payment by the terminal's Repeat Receipt (the terminal is online and idle)."""
    if payment.receipt is None:  # nothing was acknowledged and the terminal is idle
        return Final("failed", error=_NOT_BOOKED)
    try:
        result = await term.driver.repeat_receipt()
    except DeviceError as err:
        log.warning("payment.repeat_receipt_failed", device_id=term.id, error=str(err))
        problem = Problem("no-answer", "the terminal did not repeat its last transaction")
        return Final("in_doubt", error=problem, recheck=True)
    return final_of_repeat(payment.receipt, result.status_info)
