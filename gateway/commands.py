"""Cloud commands: envelope checks in the spec's order, a dispatch table, one result each.

Order (cloud-api.md): envelope shape → unknown name → signature → repeated id → expiry → clock
for physical actions → ``data`` → effect. The first failing check decides. Every command yields
exactly one ``command.result`` event; from the signature check on, the outcome is remembered in
the persistent replay cache (the ``commands`` table) in the same transaction as the result event
and the command's effect, so a repeated id replays the first outcome and has no second effect.

The replay cache keeps an id until ``keep_until`` = max(received, issued_at, expires_at) +
``clock_skew_s`` + ``replay_window_s``; rows past it are deleted in the transaction of a later
result (at most once per :data:`PRUNE_INTERVAL_S`) and only while the clock is synchronised, since
an unsynchronised clock that runs ahead would otherwise forget ids early.

Card data: an id, name or ``data`` field holding a PAN-like number (gateway/carddata.py) is
rejected ``invalid`` without echoing it, so nothing stores, logs or sends it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ValidationError

from gateway.carddata import REFUSED, card_number_field, find_pan
from gateway.clock import ClockStatus, parse_rfc3339
from gateway.config import SecuritySection
from gateway.db import Database, EventDraft, Statement, Work
from gateway.errors import StorageError
from gateway.jsonedge import BadJson, parse_json
from gateway.signing import Verifier

log = structlog.get_logger(__name__)

Status = Literal["ok", "rejected", "failed"]
PRUNE_INTERVAL_S = 600.0
_PRUNE = "DELETE FROM commands WHERE keep_until < ?"


@dataclass(frozen=True, slots=True)
class Command:
    """A command whose envelope passed the shape check."""

    id: str
    name: str
    issued_at: str
    expires_at: str | None
    data: Mapping[str, Any]
    signed: bool


@dataclass(frozen=True, slots=True)
class Outcome:
    """A handler's answer; ``events``/``statements`` commit together with the result."""

    status: Status = "ok"
    reason: str | None = None
    detail: str | None = None
    data: Mapping[str, Any] | None = None
    events: tuple[EventDraft, ...] = ()
    statements: tuple[Statement, ...] = ()


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """How to run one command name."""

    handler: Callable[[Command, Any], Awaitable[Outcome]]
    data_model: type[BaseModel]
    physical: bool = False


@dataclass(slots=True)
class CommandStats:
    """Counters for status output."""

    received: int = 0
    rejected: int = 0
    duplicates: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class CommandDispatcher:
    """Runs commands through the checks and the dispatch table (see module docstring)."""

    def __init__(self, db: Database, security: SecuritySection, clock: ClockStatus) -> None:
        self.db = db
        self.security = security
        self.clock = clock
        self.verifier = Verifier(security.command_keys)
        self.table: dict[str, CommandSpec] = {}
        self.stats = CommandStats()
        self._pruned_at = -PRUNE_INTERVAL_S  # monotonic time of the last prune

    async def prune(self, now: float | None = None) -> int:
        """Delete replay-cache rows whose ``keep_until`` is before ``now``; returns how many."""
        cutoff = time.time() if now is None else now
        before = await self.db.fetchone(
            "SELECT count(*) FROM commands WHERE keep_until < ?", (cutoff,)
        )
        await self.db.submit(Work(statements=[(_PRUNE, (cutoff,))], refusable=False))
        return int(before[0]) if before is not None else 0

    def _prune_statement(self) -> list[Statement]:
        """The prune to commit with this result: at most once per interval, clock synced only."""
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_INTERVAL_S or not self.clock.synced():
            return []
        self._pruned_at = now
        return [(_PRUNE, (time.time(),))]

    def register(self, name: str, spec: CommandSpec) -> None:
        """Add a command to the dispatch table."""
        self.table[name] = spec

    async def handle(self, topic_name: str, payload: bytes) -> None:
        """Process one command message end to end (never raises for bad input)."""
        self.stats.received += 1
        try:
            env = parse_json(payload)
        except BadJson as err:
            await self._result(None, topic_name, Outcome("rejected", "invalid", str(err)))
            return
        problem = _shape_problem(env, topic_name)
        if problem is not None:
            cid = env.get("id") if isinstance(env, dict) else None
            cid = cid if isinstance(cid, str) and 0 < len(cid) <= 128 else None
            name = (
                env.get("name")
                if isinstance(env, dict) and isinstance(env.get("name"), str)
                else topic_name
            )
            await self._result(cid, str(name), Outcome("rejected", "invalid", problem))
            return
        if find_pan(topic_name) or find_pan(env["id"]) or find_pan(env["name"]):
            await self._result(
                None,
                "?",
                Outcome("rejected", "invalid", f"id or name: looks like a card number ({REFUSED})"),
            )
            return
        cmd = Command(
            id=env["id"],
            name=env["name"],
            issued_at=env["issued_at"],
            expires_at=env.get("expires_at"),
            data=env["data"],
            signed="sig" in env,
        )
        spec = self.table.get(cmd.name)
        if spec is None:
            await self._result(
                cmd.id, cmd.name, Outcome("rejected", "unknown-command", f"no command {cmd.name!r}")
            )
            return
        if not self._signature_ok(env, cmd.name):
            await self._result(
                cmd.id,
                cmd.name,
                Outcome("rejected", "bad-signature", "missing or invalid signature"),
            )
            return
        first = await self._remembered(cmd.id)
        if first is not None:
            self.stats.duplicates += 1
            await self._result(cmd.id, cmd.name, first, duplicate=True)
            return
        outcome = await self._evaluate(cmd, spec)
        await self._result(cmd.id, cmd.name, outcome, remember=cmd)

    def _signature_ok(self, env: Mapping[str, Any], name: str) -> bool:
        required = self.security.require_signatures or name in self.security.signed_commands
        if "sig" in env:
            return self.verifier.verify(env)
        return not required

    async def _remembered(self, command_id: str) -> Outcome | None:
        row = await self.db.fetchone("SELECT result FROM commands WHERE id = ?", (command_id,))
        if row is None:
            return None
        first = json.loads(row[0])
        return Outcome(
            status=first["status"],
            reason=first.get("reason"),
            detail=first.get("detail"),
            data=first.get("data"),
        )

    async def _evaluate(self, cmd: Command, spec: CommandSpec) -> Outcome:
        synced = self.clock.synced()
        if synced and cmd.expires_at is not None and parse_rfc3339(cmd.expires_at) < time.time():
            return Outcome("rejected", "expired", f"expired at {cmd.expires_at}")
        if spec.physical and not synced:
            return Outcome(
                "rejected", "clock-unsynced", "physical actions need a synchronised clock"
            )
        try:
            data = spec.data_model.model_validate(cmd.data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "data"
            return Outcome("rejected", "invalid", f"data.{where}: {first['msg']}")
        holder = card_number_field(data.model_dump(mode="json"))
        if holder is not None:
            return Outcome(
                "rejected", "invalid", f"data.{holder}: looks like a card number ({REFUSED})"
            )
        try:
            return await spec.handler(cmd, data)
        except StorageError:
            raise  # nothing committed: no result now; the backend's retry gets the outcome
        except Exception as err:
            log.exception("command handler failed", command_id=cmd.id, name=cmd.name)
            return Outcome("failed", "internal-error", f"{type(err).__name__}: {err}")

    def _keep_until(self, cmd: Command) -> float:
        # issued_at counts too: a clock still behind after a power cut must not shorten the
        # memory of a command without expires_at
        horizon = max(time.time(), parse_rfc3339(cmd.issued_at))
        if cmd.expires_at is not None:
            horizon = max(horizon, parse_rfc3339(cmd.expires_at))
        return horizon + self.security.clock_skew_s + self.security.replay_window_s

    async def _result(
        self,
        command_id: str | None,
        name: str,
        outcome: Outcome,
        *,
        duplicate: bool = False,
        remember: Command | None = None,
    ) -> None:
        if outcome.status != "ok":
            self.stats.rejected += 1
            key = outcome.reason or outcome.status
            self.stats.by_reason[key] = self.stats.by_reason.get(key, 0) + 1
            log.info(
                "command not applied",
                command_id=command_id,
                name=name,
                reason=outcome.reason,
                detail=outcome.detail,
            )
        result: dict[str, Any] = {
            "command_id": command_id,
            "name": name,
            "status": outcome.status,
            "duplicate": duplicate,
        }
        for key in ("reason", "detail", "data"):
            value = getattr(outcome, key)
            if value is not None:
                result[key] = value
        statements = list(outcome.statements)
        if remember is not None:
            first = {k: v for k, v in result.items() if k in ("status", "reason", "detail", "data")}
            statements.append(
                (
                    "INSERT OR IGNORE INTO commands(id, name, received_at, keep_until, result) VALUES (?, ?, ?, ?, ?)",
                    (remember.id, name, time.time(), self._keep_until(remember), json.dumps(first)),
                )
            )
            statements.extend(self._prune_statement())
        events = (*outcome.events, self.db.draft("command.result", result))
        await self.db.submit(Work(events=events, statements=statements, refusable=False))


def _shape_problem(env: Any, topic_name: str) -> str | None:
    """Why an envelope is malformed, or None."""
    if not isinstance(env, dict):
        return "envelope must be a JSON object"
    cid = env.get("id")
    if not isinstance(cid, str) or not cid or len(cid) > 128:
        return "id must be a non-empty string of at most 128 characters"
    if not isinstance(env.get("name"), str):
        return "name must be a string"
    if env["name"] != topic_name:
        return f"name {env['name']!r} does not match the topic's {topic_name!r}"
    for key, required in (("issued_at", True), ("expires_at", False)):
        value = env.get(key)
        if value is None and not required:
            continue
        try:
            parse_rfc3339(str(value) if isinstance(value, str) else "")
        except ValueError:
            return f"{key} must be an RFC 3339 time"
    if not isinstance(env.get("data"), dict):
        return "data must be an object"
    if "sig" in env and not isinstance(env["sig"], str):
        return "sig must be a string"
    return None
