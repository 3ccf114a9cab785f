"""The invariants every chaos run must keep, checked from evidence gathered after the run.

Sources, each written independently of the gateway's own bookkeeping: the tills' logs (what
each till asked and was answered), the backend's record (what reached the cloud), the ZVT
simulator's ledger (what the terminal booked), the locker workload's record (what staff and
customers asked and were told, the boards' pulse counters and doors, the retained bank state),
and the database file (read-only, after a clean stop). A violation is a sentence; a report with
none passes.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.sim.zvt_sim import LedgerEntry
from gateway.backend_sim import BackendRecord
from tests.chaos.lockers import LockerEvidence
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
    lockers: LockerEvidence | None = None


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
            + "".join(
                f", {k}={v}"
                for k, v in sorted(c.items())
                if k.startswith(("payment ", "locker ", "orders ", "crash at "))
            )
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
    if ev.lockers is not None:
        _check_lockers(ev, ev.lockers, report)
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
    if ev.lockers is not None:  # a pickup the customer saw open takes the order's stock out
        for order_id in _opened_pickups(ev.lockers):
            for sku, qty in ev.lockers.orders[order_id].items:
                expected[sku] -= qty
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


# --- lockers -------------------------------------------------------------------------------------

LOST_OUTCOME = "outcome of a lock pulse"


def _opened_pickups(lk: LockerEvidence) -> set[str]:
    """Orders whose pickup the kiosk was answered ``opened`` for."""
    return {
        r.target
        for r in lk.requests
        if r.action == "pickup" and r.final is not None and r.final.get("status") == "opened"
    }


def _check_lockers(ev: Evidence, lk: LockerEvidence, report: Report) -> None:
    """Orders end collected once, every pulse audited first, lost outcomes reported, the retained
    state agrees with the doors, pickup stock movements match the collected orders."""
    conn = sqlite3.connect(f"file:{ev.db_path}?mode=ro", uri=True)
    try:
        actions = conn.execute(
            "SELECT compartment, opened_by, ref, state, seq FROM locker_actions WHERE bank = ?",
            (lk.bank,),
        ).fetchall()
        moves = conn.execute(
            "SELECT ref, sku, delta FROM movements WHERE cause = 'pickup'"
        ).fetchall()
    finally:
        conn.close()
    updates: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for env in ev.record.of_type("order.updated"):
        updates[env["data"]["order_id"]].append((env["seq"], env["data"]))
    audits = [e for e in ev.record.of_type("locker.opened") if e["data"].get("bank") == lk.bank]
    for req in lk.requests:
        if req.final is None:
            report.fail(f"locker {req.action} {req.request_id}: no final answer")
    _check_orders(lk, updates, report)
    _check_pulses(lk, audits, updates, report)
    _check_lost_outcomes(ev, lk, actions, report)
    _check_locker_state(lk, updates, report)
    _check_pickup_stock(ev, lk, moves, report)


def _check_orders(
    lk: LockerEvidence, updates: dict[str, list[tuple[int, dict[str, Any]]]], report: Report
) -> None:
    """Answered ``opened`` at pickup ⇔ collected in the backend, once; nothing stuck."""
    opened = _opened_pickups(lk)
    for oid, plan in sorted(lk.orders.items()):
        if plan.created is None:
            report.fail(f"order {oid}: order.pickup.create never got a command.result")
            continue
        if plan.created != "ok":
            report.counts["orders rejected"] += 1
            continue
        statuses = [d["status"] for _, d in updates.get(oid, [])]
        for status in ("accepted", "in_locker", "collected"):
            if statuses.count(status) > 1:
                report.fail(f"order {oid}: {statuses.count(status)} order.updated {status}")
                report.counts["duplicates applied"] += statuses.count(status) - 1
        collected = "collected" in statuses
        if oid in opened and "in_locker" in statuses and not collected:
            report.fail(f"order {oid}: pickup answered opened, backend never saw it collected")
        if collected and oid not in opened:
            report.fail(f"order {oid}: collected in the backend, no pickup was answered opened")
        if not collected:
            report.fail(f"order {oid}: not collected at the end ({plan.stuck or statuses})")
        report.counts["orders collected"] += collected
    for req in lk.requests:
        status = (req.final or {}).get("status")
        if req.action == "load" and status in ("unknown_order", "rejected"):
            report.fail(f"load {req.request_id} of {req.target}: answered {req.final}")
        if req.action == "pickup" and status in ("invalid_code", "expired", "rejected"):
            report.fail(f"pickup {req.request_id} of {req.target} with its code: {req.final}")


def _check_pulses(
    lk: LockerEvidence,
    audits: list[dict[str, Any]],
    updates: dict[str, list[tuple[int, dict[str, Any]]]],
    report: Report,
) -> None:
    """Pulses ≤ audits per compartment; every audit caused by a request, none after the end."""
    per_compartment = Counter(int(e["data"]["compartment"]) for e in audits)
    for number, pulses in sorted(lk.pulses.items()):
        report.counts["locker pulses"] += pulses
        if pulses > per_compartment.get(number, 0):
            report.fail(
                f"compartment {number}: {pulses} pulses, only "
                f"{per_compartment.get(number, 0)} locker.opened audits"
            )
    report.counts["locker audits"] = len(audits)
    asked: set[tuple[str, str]] = {(r.action, r.target) for r in lk.requests}
    done_at: dict[tuple[str, str], int] = {}  # (by, order) → seq after which it never opens
    for oid, seen in updates.items():
        for seq, data in seen:
            if data["status"] == "in_locker":
                done_at.setdefault(("load", oid), seq)
            if data["status"] == "collected":
                done_at.setdefault(("pickup", oid), seq)
    for env in audits:
        data = env["data"]
        by, number = data.get("by"), int(data["compartment"])
        target = str(number) if by == "retrieve" else str(data.get("ref"))
        if by not in ("load", "pickup", "retrieve") or (by, target) not in asked:
            report.fail(f"seq {env['seq']}: locker.opened {data} answers no request made")
        elif env["seq"] > done_at.get((by, target), env["seq"]):
            report.fail(f"seq {env['seq']}: locker.opened {data} after that order's outcome")


def _check_lost_outcomes(
    ev: Evidence, lk: LockerEvidence, actions: list[tuple[Any, ...]], report: Report
) -> None:
    """Every pulse whose outcome a kill lost is reported by a later life, once, not pending."""
    reports: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for env in ev.record.of_type("device.status"):
        data = env["data"]
        if data.get("device_id") == lk.bank and LOST_OUTCOME in str(data.get("detail")):
            found = re.search(r"compartment (\d+)", str(data["detail"]))
            reports[int(found.group(1)) if found else -1].append(env)
    boot_of = {e["seq"]: e["boot_id"] for e in ev.record.events.values()}
    unknown: dict[int, list[int]] = defaultdict(list)
    for number, by, ref, state, seq in actions:
        if state == "pending":
            report.fail(f"compartment {number}: opening by {by} {ref} still pending at the end")
        elif state == "unknown":
            unknown[int(number)].append(int(seq))
    for number in sorted(set(unknown) | set(reports)):
        got = sorted(reports.get(number, []), key=lambda e: e["seq"])
        if len(got) != len(unknown.get(number, [])):
            report.fail(
                f"compartment {number}: {len(unknown.get(number, []))} pulses with a lost "
                f"outcome, {len(got)} device.status error reports"
            )
        for audit_seq, env in zip(sorted(unknown.get(number, [])), got, strict=False):
            if env["seq"] < audit_seq or env["boot_id"] == boot_of.get(audit_seq):
                report.fail(
                    f"compartment {number}: lost outcome of seq {audit_seq} reported by "
                    f"seq {env['seq']} of the same life or before it"
                )
    report.counts["locker lost outcomes reported"] = sum(len(v) for v in reports.values())


def _check_locker_state(
    lk: LockerEvidence, updates: dict[str, list[tuple[int, dict[str, Any]]]], report: Report
) -> None:
    """The retained state at the end agrees with the doors and the orders."""
    if lk.final_state is None:
        report.fail(f"no retained store/v1/lockers/{lk.bank}/state at the end")
        return
    holding: dict[int, str] = {}  # compartment → order still in it by the backend's record
    for oid, seen in updates.items():
        last = seen[-1][1]
        if last["status"] == "in_locker" and last.get("bank") == lk.bank:
            holding[int(last["compartment"])] = oid
    for number in sorted(lk.wiring):
        state = lk.final_state.get(number)
        door = lk.doors_open.get(number)
        want = "open" if door else ("occupied" if number in holding else "free")
        if state != want:
            report.fail(
                f"compartment {number}: retained state {state!r}, door "
                f"{'open' if door else 'closed'}, order {holding.get(number)} → want {want!r}"
            )


def _check_pickup_stock(
    ev: Evidence, lk: LockerEvidence, moves: list[tuple[Any, ...]], report: Report
) -> None:
    """Pickup movements (database and backend) are exactly the collected orders' items."""
    collected = {
        e["data"]["order_id"]
        for e in ev.record.of_type("order.updated")
        if e["data"]["status"] == "collected"
    }
    want: dict[str, Counter[str]] = {
        oid: Counter({sku: -qty for sku, qty in lk.orders[oid].items})
        for oid in collected
        if oid in lk.orders
    }
    database: dict[str, Counter[str]] = defaultdict(Counter)
    for ref, sku, delta in moves:
        database[str(ref)][str(sku)] += int(delta)
    backend: dict[str, Counter[str]] = defaultdict(Counter)
    for env in ev.record.of_type("inventory.changed"):
        if env["data"].get("cause") == "pickup":
            backend[env["data"]["ref"]][env["data"]["sku"]] += env["data"]["delta"]
    for oid in sorted(set(want) | set(database) | set(backend)):
        expected = _nonzero(want.get(oid, Counter()))
        for where, moved in (("database", database), ("backend", backend)):
            got = _nonzero(moved.get(oid, Counter()))
            if got != expected:
                report.fail(
                    f"order {oid}: pickup movements in the {where} {got}, "
                    f"collected items imply {expected}"
                )


def _nonzero(counts: Counter[str]) -> dict[str, int]:
    return {k: v for k, v in sorted(counts.items()) if v}
