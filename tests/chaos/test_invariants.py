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
from gateway.schema import CORE
from tests.chaos.invariants import Evidence, check
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
