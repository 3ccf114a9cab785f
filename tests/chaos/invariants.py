"""The invariants every chaos run must keep, checked from evidence gathered after the run.

Sources, each written independently of the gateway's own bookkeeping: the tills' logs (what
each till asked and was answered), the backend's record (what reached the cloud), the ZVT
simulator's ledger (what the terminal booked), and the database file (read-only, after a clean
stop). A violation is a sentence; a report with none passes.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.sim.zvt_sim import LedgerEntry
from gateway.backend_sim import BackendRecord
from tests.chaos.tills import TillLog

FINAL_PAYMENT = {"approved", "declined", "aborted", "failed", "in_doubt"}
NOT_BOOKED = {"declined", "aborted", "failed"}


@dataclass(slots=True)
class Evidence:
    """Everything the checks read."""

    db_path: Path
    record: BackendRecord
    tills: list[TillLog]
    stock: dict[str, int] | None = None  # on_hand per SKU as the gateway answered at the end
    ledger: list[LedgerEntry] | None = None
    boots: dict[str, str] = field(default_factory=dict)  # boot_id → clock.synced of that life


@dataclass(slots=True)
class Report:
    """Figures and violations of one run."""

    violations: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def fail(self, message: str) -> None:
        """Record a violation (the first few of a kind are enough to read)."""
        self.violations.append(message)

    def summary(self, name: str) -> str:
        """The one line a test prints."""
        c = self.counts
        return (
            f"chaos {name}: kills survived={c['kills survived']} "
            f"(crash points {c['crash points hit']}), faults={c['faults']}, "
            f"events={c['events']}, sales+returns={c['tickets']}, payments={c['payments']}, "
            f"lost={c['lost']}, duplicates applied={c['duplicates applied']}, "
            f"changed payloads={c['changed payloads']}, violations={len(self.violations)}"
            + "".join(f", {k}={v}" for k, v in sorted(c.items()) if k.startswith("payment "))
        )


def check(ev: Evidence) -> Report:
    """Run every check; the report says what held and what did not."""
    report = Report()
    rows = _check_database(ev, report)
    _check_backend(ev, rows, report)
    _check_tickets(ev, report)
    _check_inventory(ev, report)
    _check_commands(ev, report)
    if ev.ledger is not None:
        _check_payments(ev, report)
    _check_clock(ev, report)
    return report


def _check_database(ev: Evidence, report: Report) -> list[tuple[int, str, str]]:
    """Integrity, gapless seq from 1; returns (seq, id, body) rows."""
    conn = sqlite3.connect(f"file:{ev.db_path}?mode=ro", uri=True)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        rows = conn.execute("SELECT seq, id, body FROM events ORDER BY seq").fetchall()
        last = int(conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()[0])
    finally:
        conn.close()
    if integrity != "ok":
        report.fail(f"database integrity_check: {integrity}")
    seqs = [r[0] for r in rows]
    if seqs != list(range(1, last + 1)):
        missing = sorted(set(range(1, last + 1)) - set(seqs))[:10]
        report.fail(f"database seqs not gapless 1..{last}: missing {missing}")
    report.counts["events"] = last
    return [(int(s), str(i), str(b)) for s, i, b in rows]


def _check_backend(ev: Evidence, rows: list[tuple[int, str, str]], report: Report) -> None:
    """Every committed event reached the backend unchanged; no gap, no reused seq or id."""
    rec = ev.record
    report.counts["changed payloads"] = len(rec.changed_ids)
    if rec.changed_ids:
        report.fail(f"event ids delivered with changed payloads: {rec.changed_ids[:5]}")
    if rec.seq_reused:
        report.fail(f"seqs reused for different event ids: {rec.seq_reused[:5]}")
    if gaps := rec.gaps():
        report.fail(f"backend sees gaps in seq: {gaps[:10]}")
    ids = Counter(i for _, i, _ in rows)
    if reused := [i for i, n in ids.items() if n > 1]:
        report.fail(f"event ids reused within the database: {reused[:5]}")
    lost = 0
    for seq, event_id, body in rows:
        got = rec.events.get(seq)
        if got is None:
            if seq <= rec.contiguous:
                lost += 1
            continue  # committed during the final clean stop: held, sent at the next start
        if got["id"] != event_id or _canon(got) != _canon(json.loads(body)):
            report.fail(f"seq {seq}: backend holds {_canon(got)[:120]}, database {body[:120]}")
    extra = sorted(set(rec.events) - {r[0] for r in rows})
    if extra:
        report.fail(f"backend holds seqs the database never committed: {extra[:10]}")
    report.counts["lost"] = lost
    if lost:
        report.fail(f"{lost} committed events never reached the backend")


def _canon(env: dict[str, Any]) -> str:
    return json.dumps(env, sort_keys=True)


def _ticket_requests(ev: Evidence) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """(kind, id, request body) of every sale and return the tills made."""
    for till in ev.tills:
        for rid, p in till.sent.items():
            if p.action in ("sale", "return"):
                yield p.action, rid, p.body


def _check_tickets(ev: Evidence, report: Report) -> None:
    """Every receipted sale/return is in the backend once, as sent; one seq per id."""
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for kind in ("sale", "return"):
        for env in ev.record.of_type(f"{kind}.completed"):
            by_id[env["data"][f"{kind}_id"]].append(env)
    dup = sum(len(v) - 1 for v in by_id.values() if len(v) > 1)
    report.counts["duplicates applied"] += dup
    if dup:
        twice = [k for k, v in by_id.items() if len(v) > 1][:5]
        report.fail(f"{dup} sales/returns recorded more than once: {twice}")
    finals = {rid: body for t in ev.tills for rid, body in t.finals.items()}
    replies = {rid: body for t in ev.tills for rid, body in t.replies.items()}
    receipted = 0
    for kind, rid, request in _ticket_requests(ev):
        answer = finals.get(rid)
        if answer is None:
            report.fail(f"{kind} {rid}: no final answer")
            continue
        if answer["status"] not in ("accepted", "duplicate"):
            report.fail(f"{kind} {rid}: answered {answer}")
            continue
        receipted += 1
        seqs = {r["seq"] for r in replies[rid] if "seq" in r}
        if len(seqs) != 1:
            report.fail(f"{kind} {rid}: answered with different seqs {sorted(seqs)}")
        env = ev.record.events.get(answer["seq"])
        if env is None or env["type"] != f"{kind}.completed":
            report.fail(f"{kind} {rid}: receipted as seq {answer['seq']}, backend has {env}")
            report.counts["lost"] += 1
            continue
        data = env["data"]
        if data[f"{kind}_id"] != rid or data["lines"] != request["lines"]:
            report.fail(f"{kind} {rid}: backend event {data} differs from the request")
        if data["total_minor"] != request["total_minor"]:
            report.fail(f"{kind} {rid}: total {data['total_minor']} != {request['total_minor']}")
    report.counts["tickets"] = receipted
    known = {rid for _, rid, _ in _ticket_requests(ev)}
    if stray := sorted(set(by_id) - known):
        report.fail(f"backend has sales/returns no till made: {stray[:5]}")


def _check_inventory(ev: Evidence, report: Report) -> None:
    """Stock movements add up to what the receipted sales and returns imply, everywhere."""
    expected: Counter[str] = Counter()
    finals = {rid: body for t in ev.tills for rid, body in t.finals.items()}
    for kind, rid, request in _ticket_requests(ev):
        if finals.get(rid, {}).get("status") in ("accepted", "duplicate"):
            sign = -1 if kind == "sale" else 1
            for line in request["lines"]:
                expected[line["sku"]] += sign * line["qty"]
    backend: Counter[str] = Counter()
    for env in ev.record.of_type("inventory.changed"):
        backend[env["data"]["sku"]] += env["data"]["delta"]
    conn = sqlite3.connect(f"file:{ev.db_path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT sku, SUM(delta) FROM movements GROUP BY sku").fetchall()
    finally:
        conn.close()
    database = Counter({str(s): int(d) for s, d in rows})
    skus = set(expected) | set(backend) | set(database) | set(ev.stock or {})
    for sku in sorted(skus):
        want = expected.get(sku, 0)
        seen = {"backend": backend.get(sku, 0), "database": database.get(sku, 0)}
        if ev.stock is not None:
            seen["gateway answer"] = ev.stock.get(sku, 0)
        if any(v != want for v in seen.values()):
            report.fail(f"stock of {sku}: receipts imply {want}, {seen}")


def _check_commands(ev: Evidence, report: Report) -> None:
    """Every command the backend sent was applied at most once (one non-duplicate result)."""
    for cid, results in ev.record.results().items():
        firsts = [r for r in results if not r["duplicate"]]
        if cid is not None and len(firsts) > 1:
            report.fail(f"command {cid} applied {len(firsts)} times")
            report.counts["duplicates applied"] += len(firsts) - 1


@dataclass(slots=True)
class _PaymentView:
    """The terminal's bookings and the cloud's payment events, indexed."""

    booked: Counter[int]
    completed: dict[str, list[dict[str, Any]]]
    resolved: dict[str, list[dict[str, Any]]]
    finals: dict[str, dict[str, Any]]


def _check_payments(ev: Evidence, report: Report) -> None:
    """At most one booked charge per request; the gateway's outcome agrees with the terminal."""
    assert ev.ledger is not None
    view = _PaymentView(
        Counter(
            e.amount_minor for e in ev.ledger if e.kind == "authorization" and e.result_code == 0
        ),
        defaultdict(list),
        defaultdict(list),
        {rid: body for t in ev.tills for rid, body in t.finals.items()},
    )
    for env in ev.record.of_type("payment.completed"):
        view.completed[env["data"]["request_id"]].append(env["data"])
    for env in ev.record.of_type("payment.resolved"):
        view.resolved[env["data"]["request_id"]].append(env["data"])
    for till in ev.tills:
        for rid, p in till.sent.items():
            if p.action == "payment/request":
                report.counts["payments"] += 1
                _check_payment(rid, p.body["amount_minor"], view, report)


def _check_payment(rid: str, amount: int, view: _PaymentView, report: Report) -> None:
    charges = view.booked.get(amount, 0)
    if charges > 1:
        report.fail(f"payment {rid}: booked {charges} times by the terminal")
        report.counts["duplicates applied"] += charges - 1
    events = view.completed.get(rid, [])
    if len(events) > 1:
        report.fail(f"payment {rid}: {len(events)} payment.completed events")
    answer = view.finals.get(rid)
    if _refused_offline(answer):  # the till takes another tender; nothing may be charged
        if charges or events:
            report.fail(f"payment {rid}: refused (terminal offline) yet {charges=} {events=}")
        report.counts["payment refused offline"] += 1
        return
    if answer is None or answer["status"] not in FINAL_PAYMENT:
        report.fail(f"payment {rid}: no final answer ({answer})")
        return
    if not events:
        report.fail(f"payment {rid}: answered {answer['status']}, no payment.completed")
        report.counts["lost"] += 1
        return
    if events[0]["status"] != answer["status"]:
        report.fail(f"payment {rid}: till told {answer['status']}, cloud {events[0]}")
    resolved = view.resolved.get(rid)
    status = resolved[-1]["status"] if resolved else events[0]["status"]
    if status == "approved" and charges != 1:
        report.fail(f"payment {rid}: approved but booked {charges} times")
    if status in NOT_BOOKED and charges:
        report.fail(f"payment {rid}: {status} but the terminal booked it")
    report.counts[f"payment {status}"] += 1


def _refused_offline(answer: dict[str, Any] | None) -> bool:
    if answer is None or answer.get("status") != "rejected":
        return False
    return bool(answer.get("error", {}).get("code") == "terminal-offline")


def _check_clock(ev: Evidence, report: Report) -> None:
    """An event says ``synced`` only from a life whose clock was trusted."""
    want = {"yes": "synced", "no": "unsynced"}
    for env in ev.record.events.values():
        mode = ev.boots.get(env["boot_id"])
        if mode in want and env["clock"] != want[mode]:
            report.fail(f"seq {env['seq']}: clock {env['clock']} from a life with synced={mode}")
            return
