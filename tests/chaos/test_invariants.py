"""The invariant checks can fail: each broken world below must be reported.

A small consistent world (database, backend record, till log, terminal ledger) passes; every
test then breaks one thing the way a faulty gateway would and expects the matching violation.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devices.sim.zvt_sim import LedgerEntry
from gateway.backend_sim import BackendRecord
from gateway.schema import CORE, MIGRATIONS
from tests.chaos.invariants import Evidence, check
from tests.chaos.lockers import BANK, WIRING, KioskRequest, LockerEvidence, OrderPlan
from tests.chaos.tills import Pending, TillLog
from tests.tillclient import sale

SKU = "4006381333931"


def _env(seq: int, type_: str, data: dict[str, Any], boot: str = "b1") -> dict[str, Any]:
    return {
        "id": f"ev-{seq}", "seq": seq, "type": type_, "store_id": "s", "boot_id": boot,
        "occurred_at": "2026-11-22T18:00:00.000Z", "clock": "synced", "data": data,
    }  # fmt: skip


def _world(tmp_path: Path) -> Evidence:
    """One sale of 2 x SKU (seq 1) and its stock movement (seq 2); one approved payment (seq 3)."""
    body = sale("pos-1-s-1", [(SKU, 2, 100)])
    events = [
        _env(1, "sale.completed", {"sale_id": "pos-1-s-1", "lines": body["lines"], "total_minor": 200}),
        _env(2, "inventory.changed", {"sku": SKU, "delta": -2}),
        _env(3, "payment.completed", {"request_id": "p-1", "status": "approved"}),
    ]  # fmt: skip
    db = tmp_path / "g.db"
    conn = sqlite3.connect(db)
    conn.executescript(CORE[0])
    conn.executemany(
        "INSERT INTO events(seq, id, type, created_at, body) VALUES (?, ?, ?, 0, ?)",
        [(e["seq"], e["id"], e["type"], json.dumps(e)) for e in events],
    )
    conn.execute("INSERT INTO movements VALUES (2, ?, -2, 'sale', 'pos-1-s-1')", (SKU,))
    conn.execute("UPDATE meta SET value = 3 WHERE key = 'last_seq'")
    conn.commit()
    conn.close()
    record = BackendRecord()
    for e in events:
        record.events[e["seq"]] = e
        record.bodies_by_id[e["id"]] = json.dumps(e, sort_keys=True)
    record.contiguous = 3
    till = TillLog()
    till.sent["pos-1-s-1"] = Pending("sale", "sale_id", body)
    till.finals["pos-1-s-1"] = {"sale_id": "pos-1-s-1", "status": "accepted", "seq": 1}
    till.replies["pos-1-s-1"] = [till.finals["pos-1-s-1"]]
    pay = {"request_id": "p-1", "kind": "purchase", "amount_minor": 777, "currency": "EUR"}
    till.sent["p-1"] = Pending("payment/request", "request_id", pay)
    till.finals["p-1"] = {"request_id": "p-1", "status": "approved"}
    ledger = [LedgerEntry("authorization", 1, 1, 777, 0)]
    return Evidence(db, record, [till], stock={SKU: -2}, ledger=ledger, boots={"b1": "yes"})


def test_consistent_world_passes(tmp_path: Path) -> None:
    report = check(_world(tmp_path))
    assert report.violations == []
    assert report.counts["tickets"] == 1 and report.counts["payments"] == 1


def _lose_sale(ev: Evidence) -> None:
    del ev.record.events[1]


def _change_payload(ev: Evidence) -> None:
    ev.record.changed_ids.append("ev-1")


def _apply_twice(ev: Evidence) -> None:
    again = dict(ev.record.events[1], id="ev-4", seq=4)
    ev.record.events[4] = again


def _gap_in_database(ev: Evidence) -> None:
    with sqlite3.connect(ev.db_path) as conn:
        conn.execute("DELETE FROM events WHERE seq = 2")


def _stock_drift(ev: Evidence) -> None:
    ev.stock = {SKU: -4}


def _charge_twice(ev: Evidence) -> None:
    assert ev.ledger is not None
    ev.ledger.append(LedgerEntry("authorization", 2, 2, 777, 0))


def _approved_not_booked(ev: Evidence) -> None:
    ev.ledger = []


def _receipt_without_answer(ev: Evidence) -> None:
    ev.tills[0].finals.pop("pos-1-s-1")


def _two_seqs_for_one_id(ev: Evidence) -> None:
    ev.tills[0].replies["pos-1-s-1"].append({"status": "duplicate", "seq": 9})


def _clock_lies(ev: Evidence) -> None:
    ev.boots["b1"] = "no"


def _corrupt_file(ev: Evidence) -> None:
    with sqlite3.connect(ev.db_path) as conn:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("UPDATE sqlite_master SET rootpage = 9999 WHERE name = 'movements_sku'")


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_lose_sale, "never reached the backend"),
        (_change_payload, "changed payloads"),
        (_apply_twice, "more than once"),
        (_gap_in_database, "not gapless"),
        (_stock_drift, "stock of"),
        (_charge_twice, "booked 2 times"),
        (_approved_not_booked, "approved but booked 0"),
        (_receipt_without_answer, "no final answer"),
        (_two_seqs_for_one_id, "different seqs"),
        (_clock_lies, "clock synced"),
        (_corrupt_file, "integrity"),
    ],
)
def test_broken_world_is_reported(
    tmp_path: Path, breakage: Callable[[Evidence], None], expected: str
) -> None:
    ev = _world(tmp_path)
    breakage(ev)
    try:
        violations = check(ev).violations
    except sqlite3.DatabaseError as err:  # a corrupt file may not even be readable
        violations = [f"integrity: {err}"]
    assert any(expected in v for v in violations), violations


# --- lockers ------------------------------------------------------------------------------------


def _append(ev: Evidence, type_: str, data: dict[str, Any], boot: str = "b1") -> int:
    """Commit one more event (database and backend alike); its seq."""
    seq = max(ev.record.events) + 1
    env = _env(seq, type_, data, boot)
    with sqlite3.connect(ev.db_path) as conn:
        conn.execute(
            "INSERT INTO events(seq, id, type, created_at, body) VALUES (?, ?, ?, 0, ?)",
            (seq, env["id"], type_, json.dumps(env)),
        )
        conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (seq,))
    ev.record.events[seq] = env
    ev.record.bodies_by_id[env["id"]] = json.dumps(env, sort_keys=True)
    ev.record.contiguous = seq
    return seq


def _locker_world(tmp_path: Path) -> Evidence:
    """The base world plus order o-1 (1 x SKU) loaded into compartment 1 and collected."""
    ev = _world(tmp_path)
    with sqlite3.connect(ev.db_path) as conn:
        for step in MIGRATIONS["lockers"]:
            conn.executescript(step)
    order = {"order_id": "o-1", "status": "accepted"}
    opened = {"bank": BANK, "compartment": 1, "ref": "o-1"}
    placed = {"bank": BANK, "compartment": 1}
    _append(ev, "order.updated", order)
    load_seq = _append(ev, "locker.opened", opened | {"by": "load"})
    _append(ev, "order.updated", order | placed | {"status": "in_locker", "pickup_code": "123456"})
    pickup_seq = _append(ev, "locker.opened", opened | {"by": "pickup"})
    _append(ev, "order.updated", order | placed | {"status": "collected"})
    move_seq = _append(ev, "inventory.changed", {"sku": SKU, "delta": -1, "cause": "pickup",
                                                 "ref": "o-1"})  # fmt: skip
    with sqlite3.connect(ev.db_path) as conn:
        conn.execute("INSERT INTO movements VALUES (?, ?, -1, 'pickup', 'o-1')", (move_seq, SKU))
        conn.executemany(
            "INSERT INTO locker_actions VALUES (?, ?, 1, ?, 'o-1', 'done', ?)",
            [("a-1", BANK, "load", load_seq), ("a-2", BANK, "pickup", pickup_seq)],
        )
    load = KioskRequest("load", "l-1", {"request_id": "l-1", "order_id": "o-1"}, "o-1")
    load.final = {"request_id": "l-1", "status": "opened", "compartment": 1}
    pickup = KioskRequest("pickup", "p-1", {"request_id": "p-1", "code": "123456"}, "o-1")
    pickup.final = {"request_id": "p-1", "status": "opened", "compartment": 1}
    ev.lockers = LockerEvidence(
        bank=BANK,
        wiring=dict(WIRING),
        orders={"o-1": OrderPlan("o-1", [(SKU, 1)], "S", "c-1", created="ok")},
        requests=[load, pickup],
        pulses={n: 2 if n == 1 else 0 for n in WIRING},
        doors_open=dict.fromkeys(WIRING, False),
        final_state=dict.fromkeys(WIRING, "free"),
    )
    ev.stock = {SKU: -3}
    return ev


def test_consistent_locker_world_passes(tmp_path: Path) -> None:
    report = check(_locker_world(tmp_path))
    assert report.violations == []
    assert report.counts["orders collected"] == 1 and report.counts["locker pulses"] == 2


def _pulse_without_audit(ev: Evidence) -> None:
    assert ev.lockers is not None
    ev.lockers.pulses[1] += 1  # e.g. a lost outcome repeated at start-up without an audit


def _collected_twice(ev: Evidence) -> None:
    _append(ev, "order.updated", {"order_id": "o-1", "status": "collected"})


def _opened_never_collected(ev: Evidence) -> None:
    seq = next(s for s, e in ev.record.events.items() if e["data"].get("status") == "collected")
    env = _env(seq, "device.status", {"device_id": BANK, "kind": "locker", "state": "online"})
    ev.record.events[seq] = env


def _lost_outcome_not_reported(ev: Evidence) -> None:
    with sqlite3.connect(ev.db_path) as conn:
        conn.execute("UPDATE locker_actions SET state = 'unknown' WHERE action_id = 'a-2'")


def _reported_by_the_same_life(ev: Evidence) -> None:
    _lost_outcome_not_reported(ev)
    detail = "compartment 1: outcome of a lock pulse (by pickup, ref o-1) was lost in a restart"
    _append(ev, "device.status", {"device_id": BANK, "kind": "locker", "state": "error",
                                  "detail": detail})  # fmt: skip


def _state_says_open(ev: Evidence) -> None:
    assert ev.lockers is not None
    ev.lockers.final_state = dict(ev.lockers.final_state or {}) | {1: "open"}


def _pickup_takes_too_much(ev: Evidence) -> None:
    with sqlite3.connect(ev.db_path) as conn:
        conn.execute("UPDATE movements SET delta = -2 WHERE cause = 'pickup'")


def _opened_again_after_collected(ev: Evidence) -> None:
    assert ev.lockers is not None
    _append(ev, "locker.opened", {"bank": BANK, "compartment": 1, "by": "pickup", "ref": "o-1"})


def _opened_unasked(ev: Evidence) -> None:
    _append(ev, "locker.opened", {"bank": BANK, "compartment": 2, "by": "technician",
                                  "ref": "uid:0"})  # fmt: skip


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (_pulse_without_audit, "3 pulses, only 2 locker.opened audits"),
        (_collected_twice, "2 order.updated collected"),
        (_opened_never_collected, "backend never saw it collected"),
        (_lost_outcome_not_reported, "1 pulses with a lost outcome, 0 device.status"),
        (_reported_by_the_same_life, "of the same life"),
        (_state_says_open, "retained state 'open', door closed"),
        (_pickup_takes_too_much, "pickup movements in the database"),
        (_opened_again_after_collected, "after that order's outcome"),
        (_opened_unasked, "answers no request made"),
    ],
)
def test_broken_locker_world_is_reported(
    tmp_path: Path, breakage: Callable[[Evidence], None], expected: str
) -> None:
    ev = _locker_world(tmp_path)
    breakage(ev)
    violations = check(ev).violations
    assert any(expected in v for v in violations), violations
