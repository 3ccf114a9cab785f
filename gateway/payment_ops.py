"""Operations beside payments: end-of-day (cloud command), the technician's status and resolve.

Those that talk to a terminal take its slot, so they never interleave with a payment or its
recovery. Technician actions answer ``{"ok": true, ...}`` or ``{"ok": false, "error": {code,
message}}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from devices.errors import DeviceError
from devices.zvt_codec import StatusInfo
from gateway.clock import now_rfc3339
from gateway.db import Database, Work
from gateway.errors import StorageError
from gateway.linkstate import DeviceState
from gateway.payment_book import PaymentBook
from gateway.payment_records import Final, end_of_day_data
from gateway.payment_terminal import Terminal

log = structlog.get_logger(__name__)


async def end_of_day(
    term: Terminal, db: Database, *, taken: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Run End-of-Day once the terminal is free and online (≤ T4); commit payment.end_of_day.

    ``taken`` is awaited once the terminal is ours, before anything is sent; if it raises,
    nothing is sent and the exception propagates.
    """
    info: StatusInfo | None = None
    code: int | None = None
    error: str | None = None
    await term.slot.take("end_of_day")
    try:
        if taken is not None:
            await taken()
        if not await term.wait_until(lambda: term.online_after(0), term.settings.t4_s):
            error = "terminal-offline"
        else:
            result = await term.driver.end_of_day()
            info = result.status_info
            code = info.result_code if info is not None else result.abort_code
    except DeviceError as err:
        log.warning("payment.end_of_day_failed", device_id=term.id, error=str(err))
        error = "terminal-error"
    finally:
        term.slot.release()
    data = end_of_day_data(term.id, now_rfc3339(), info, code, error)
    try:
        await db.submit(Work(events=[db.draft("payment.end_of_day", data)], refusable=False))
    except StorageError as err:
        log.error("payment.end_of_day_not_committed", device_id=term.id, error=str(err))
        return
    log.info("payment.end_of_day", device_id=term.id, result_code=code, error=error)


async def terminal_status(term: Terminal) -> dict[str, Any]:
    """State, counters and, when the terminal is online and free, a Status enquiry."""
    entry: dict[str, Any] = {
        "device_id": term.id,
        "state": term.driver.state.value,
        "busy_with": term.slot.holder,
        "counters": dataclasses.asdict(term.driver.counters),
    }
    if term.driver.state is DeviceState.ONLINE and term.slot.try_take("status"):
        try:
            status = await term.driver.status_enquiry()
            entry |= {
                "ready": status.ready,
                "status_code": status.status_code,
                "sw_version": status.sw_version,
            }
        except DeviceError as err:
            entry["error"] = str(err)
        finally:
            term.slot.release()
    return entry


async def resolve_by_technician(
    book: PaymentBook, args: dict[str, Any], uid: int
) -> dict[str, Any]:
    """Settle an in_doubt payment as ``approved`` or ``failed`` (``payment.resolved``)."""
    rid, status = args.get("request_id"), args.get("status")
    if status not in ("approved", "failed"):
        return _error("invalid", "status must be approved or failed")
    doubt = book.doubtful.get(rid) if isinstance(rid, str) else None
    if doubt is None or not isinstance(rid, str):
        return _error("not-in-doubt", "no in_doubt payment has this request_id")
    receipt = doubt.payment.receipt if status == "approved" else None
    final = Final(status, receipt.result_code if receipt else None, receipt)
    seq = await book.resolve(rid, final, f"uid:{uid}")
    if seq is None:
        return _error("not-in-doubt", "it was settled meanwhile")
    log.info("payment.resolved", request_id=rid, status=status, by=f"uid:{uid}")
    return {"ok": True, "request_id": rid, "status": status, "seq": seq}


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "error": {"code": code, "message": message}}
