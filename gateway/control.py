"""The control socket: technician actions on a Unix socket, one JSON object per line each way.

::

    request  {"id": <any JSON>, "action": "<name>", "args": {...}}
    reply    {"id": <echoed>, "ok": true, "result": {...}}
             {"id": <echoed>, "ok": false, "error": {"code": "<code>", "message": "<text>"}}

Error codes: ``bad-json``, ``bad-request`` (not an object, missing or extra keys),
``unknown-action``, ``bad-args``, ``too-large`` (a line over 64 KiB; the connection is closed),
``busy`` (too many connections; closed), ``timeout``, ``unavailable`` (a link or device is down),
``failed`` (the action was refused or went wrong), ``internal`` (a bug, logged with traceback).

Built-in actions, all read-only: ``status``, ``outbox.stats``, ``outbox.list`` (``limit``),
``devices``. Services add theirs to ``Gateway.actions`` as ``handler(args, uid) -> dict``; a
handler reports bad arguments with ``ValueError`` (pydantic's ``ValidationError`` is one) and a
refusal with :class:`ActionError` or by returning ``{"ok": false, "error": {"code", "message"}}``
(both become an error reply). Names in :data:`READ_ONLY_ACTIONS` are marked read-only in
the audit line; every other action is assumed to change something.

Audit: every request naming an action is logged (``control action``: action, uid and pid from
SO_PEERCRED, args, read_only) before it runs, and its outcome after. Physical actions commit their
own event (``locker.open`` → ``locker.opened`` with ``by: technician``, ``ref: uid:<n>``;
``payment.resolve`` → ``payment.resolved``); the others are audited by the log lines alone.

A slow or dead client cannot block the daemon: each connection is a task in the component's
TaskGroup, idle connections are closed after ``idle_timeout_s``, a reply that cannot be written
within ``write_timeout_s`` drops the connection, and at most ``max_connections`` are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from gateway import __version__
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, RetryableError
from gateway.jsonedge import BadJson, parse_json

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger(__name__)

MAX_LINE_BYTES = 64 * 1024
SOCKET_MODE = 0o660
SERVICE_GROUP = "store-gateway"
#: Actions that only read; the audit line says so. Everything else is taken to change something.
READ_ONLY_ACTIONS = frozenset(
    {"status", "outbox.stats", "outbox.list", "devices", "discovery.list"}
)
OUTBOX_LIST_SQL = (
    "SELECT seq, type, created_at, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
)

Action = Callable[[dict[str, Any], int], Awaitable[dict[str, Any]]]


class ControlSocketError(GatewayError):
    """The control socket cannot be set up (path taken, permissions); the daemon runs without."""


class ActionError(Exception):
    """An action refused or failed: ``code`` for scripts, ``message`` for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


class _Request(BaseModel):
    """One request line (the protocol's only inbound shape)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: JsonValue = None
    action: str = Field(min_length=1, max_length=64)
    args: dict[str, JsonValue] = Field(default_factory=dict)


class _NoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _ListArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(20, ge=1, le=1000)


class _Closing(Exception):
    """Raised in the TaskGroup body at shutdown so that every client task is cancelled."""


def reply_ok(req_id: JsonValue, result: dict[str, Any]) -> dict[str, Any]:
    """A success reply."""
    return {"id": req_id, "ok": True, "result": result}


def reply_error(req_id: JsonValue, code: str, message: str) -> dict[str, Any]:
    """An error reply."""
    return {"id": req_id, "ok": False, "error": {"code": code, "message": message}}


def encode(reply: dict[str, Any]) -> bytes:
    """One reply line (compact JSON, UTF-8, newline)."""
    return (json.dumps(reply, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


# --- shared with gatewayctl (which reads the database itself while the daemon is down) -------


def outbox_entries(
    rows: list[tuple[Any, ...]], *, sent_through: int, now: float
) -> list[dict[str, Any]]:
    """Rows of :data:`OUTBOX_LIST_SQL` as listed by ``outbox.list`` (state pending or sent)."""
    entries = []
    for seq, type_, created_at, body in rows:
        try:
            occurred_at = json.loads(body).get("occurred_at")
        except (ValueError, AttributeError):
            occurred_at = None
        entries.append(
            {
                "seq": int(seq),
                "type": str(type_),
                "occurred_at": occurred_at,
                "age_s": round(max(0.0, now - float(created_at)), 1),
                "state": "sent" if int(seq) <= sent_through else "pending",
            }
        )
    return entries


def configured_devices(
    config: GatewayConfig, states: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Configured devices with their state from health (``unknown`` without one), then others."""
    known = {(str(d.get("kind")), str(d.get("device_id"))): d for d in states or []}
    rows: list[dict[str, Any]] = []
    for kind, items in (("payment", config.payment_terminals), ("locker", config.locker_banks)):
        for item in items:
            health = known.pop((kind, item.id), {})
            rows.append(
                {
                    "device_id": item.id,
                    "kind": kind,
                    "state": health.get("state", "unknown"),
                    "endpoint": item.endpoint,
                }
            )
    rows.extend(
        {"device_id": d.get("device_id"), "kind": d.get("kind"), "state": d.get("state")}
        | {"endpoint": None}
        for d in known.values()
    )
    return rows


# --- the server -------------------------------------------------------------------------------


class ControlServer:
    """Serves the control socket (a Component: ``run`` until ``request_stop``)."""

    def __init__(
        self,
        gw: Gateway,
        sock: socket.socket,
        *,
        max_connections: int = 16,
        idle_timeout_s: float = 120.0,
        write_timeout_s: float = 5.0,
        action_timeout_s: float = 60.0,
    ) -> None:
        self.gw = gw
        self.path = Path(gw.config.control.socket)
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.write_timeout_s = write_timeout_s
        self.action_timeout_s = action_timeout_s
        self._sock: socket.socket | None = sock
        self._inode = os.stat(self.path).st_ino
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._connections = 0
        self._builtins: dict[str, Action] = {
            "status": self._status,
            "outbox.stats": self._outbox_stats,
            "outbox.list": self._outbox_list,
            "devices": self._devices,
        }

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Accept clients until stopped; then close every connection and unlink the socket."""
        sock, self._sock = self._sock, None
        if sock is None or self._stop.is_set():
            self.close()
            return
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                try:
                    server = await asyncio.start_unix_server(
                        self._accept, sock=sock, limit=MAX_LINE_BYTES
                    )
                except OSError as err:  # the daemon runs on without its control socket
                    log.error("control socket unavailable", path=str(self.path), error=str(err))
                    sock.close()
                    await self._stop.wait()
                    raise _Closing from err
                log.info("control socket listening", path=str(self.path))
                await self._stop.wait()
                self._tg = None
                server.close()
                raise _Closing
        except* _Closing:
            pass
        finally:
            self._tg = None
            self.close()

    def request_stop(self) -> None:
        """Stop accepting and close every connection."""
        self._stop.set()

    def close(self) -> None:
        """Close the listening socket (if never served) and unlink the file if it is still ours."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    # --- connections --------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Called by asyncio for each connection: hand it to the TaskGroup, or refuse it."""
        if self._tg is None or self._connections >= self.max_connections:
            writer.write(encode(reply_error(None, "busy", "too many control connections")))
            writer.close()
            return
        self._connections += 1
        self._tg.create_task(self._client(reader, writer), name="control-client")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = _peer(writer)
            while (line := await self._read(reader, writer)) is not None:
                if not await self._write(writer, await self._handle(line, peer)):
                    return
        except OSError as err:  # reset, broken pipe: the client's business, not the daemon's
            log.debug("control client went away", error=str(err))
        except Exception:  # a bug in one connection must not take the daemon down
            log.exception("control connection failed")
        finally:
            self._connections -= 1
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a client that does not read would hold close() open
            else:
                writer.close()

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes | None:
        """The next request line; None at EOF, idle timeout or after refusing an oversized line."""
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as err:  # EOF: a last line without newline still counts
            return err.partial if err.partial.strip() else None
        except TimeoutError:
            log.debug("control client idle; closed")
            return None
        except asyncio.LimitOverrunError:
            message = f"request line longer than {MAX_LINE_BYTES} bytes; closing"
            await self._write(writer, reply_error(None, "too-large", message))
            return None

    async def _write(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> bool:
        """Send one reply; False when the client did not take it in time (connection dropped)."""
        try:
            data = encode(reply)
        except (TypeError, ValueError) as err:
            log.error("control reply not serialisable", error=str(err))
            data = encode(reply_error(reply.get("id"), "internal", "reply not serialisable"))
        writer.write(data)
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await writer.drain()
        except TimeoutError:
            log.warning("control client does not read its replies; dropped")
            return False
        return True

    # --- requests -----------------------------------------------------------------------------

    async def _handle(self, line: bytes, peer: Peer) -> dict[str, Any]:
        """One request line → one reply (never raises for anything the client sent)."""
        try:
            raw = parse_json(line)
        except BadJson as err:
            return reply_error(None, "bad-json", str(err))
        if not isinstance(raw, dict):
            return reply_error(None, "bad-request", "a request is a JSON object")
        req_id = raw.get("id")
        try:
            req = _Request.model_validate(raw)
        except ValidationError as err:
            return reply_error(req_id, "bad-request", _first_error(err))
        handler = self._builtins.get(req.action) or self.gw.actions.get(req.action)
        if handler is None:
            log.info("control action unknown", action=req.action, uid=peer.uid, pid=peer.pid)
            return reply_error(req_id, "unknown-action", f"no action {req.action!r}")
        return await self._run_action(req, handler, peer)

    async def _run_action(self, req: _Request, handler: Action, peer: Peer) -> dict[str, Any]:
        audit = log.bind(action=req.action, uid=peer.uid, pid=peer.pid)
        audit.info("control action", args=req.args, read_only=req.action in READ_ONLY_ACTIONS)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.action_timeout_s):
                result = await handler(dict(req.args), peer.uid)
        except ActionError as err:
            code, message = err.code, err.message
        except ValidationError as err:
            code, message = "bad-args", _first_error(err)
        except ValueError as err:
            code, message = "bad-args", str(err)
        except TimeoutError:
            code, message = "timeout", f"no outcome within {self.action_timeout_s:g} s"
        except RetryableError as err:
            code, message = "unavailable", str(err)
        except GatewayError as err:
            code, message = "failed", str(err)
        except Exception as err:  # noqa: BLE001 - a bug in one action must not take the socket down
            audit.exception("control action crashed")
            code, message = "internal", f"{type(err).__name__}: {err}"
        else:
            refusal = _refusal(result)
            if refusal is None:
                audit.info("control action done", ok=True, ms=_ms_since(started))
                return reply_ok(req.id, result)
            code, message = refusal
        audit.info("control action done", ok=False, code=code, error=message, ms=_ms_since(started))
        return reply_error(req.id, code, message)

    # --- built-in actions ---------------------------------------------------------------------

    async def _status(self, args: dict[str, Any], _uid: int) -> dict[str, Any]:
        _NoArgs.model_validate(args)
        body = await self.gw.health()
        body["gateway"] = {
            "version": __version__,
            "store_id": self.gw.config.store.id,
            "pid": os.getpid(),
            "boot_id": self.gw.boot_id,
            "uptime_s": body.get("uptime_s"),
            "config": _text_or_none(getattr(self.gw, "config_path", None)),
            "database": str(self.gw.config.storage.path),
        }
        return body

    async def _outbox_stats(self, args: dict[str, Any], _uid: int) -> dict[str, Any]:
        _NoArgs.model_validate(args)
        stats = await self.gw.outbox.stats()
        return {**stats.as_health(), "last_seq": stats.last_seq}

    async def _outbox_list(self, args: dict[str, Any], _uid: int) -> dict[str, Any]:
        limit = _ListArgs.model_validate(args).limit
        outbox = self.gw.outbox
        rows = await self.gw.db.fetchall(OUTBOX_LIST_SQL, (outbox.acked_through, limit))
        sent = max(outbox.sent_through, outbox.acked_through)
        return {"events": outbox_entries(rows, sent_through=sent, now=time.time())}

    async def _devices(self, args: dict[str, Any], _uid: int) -> dict[str, Any]:
        _NoArgs.model_validate(args)
        health = await self.gw.health()
        return {"devices": configured_devices(self.gw.config, health.get("devices"))}


def _peer(writer: asyncio.StreamWriter) -> Peer:
    sock = writer.get_extra_info("socket")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid=pid, uid=uid, gid=gid)


def _refusal(result: dict[str, Any]) -> tuple[str, str] | None:
    """``(code, message)`` when a handler returned ``{"ok": false, "error": {...}}``."""
    error = result.get("error") if isinstance(result, dict) else None
    if not isinstance(result, dict) or result.get("ok") is not False or not isinstance(error, dict):
        return None
    return str(error.get("code", "failed")), str(error.get("message", "the action failed"))


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def _text_or_none(value: object) -> str | None:
    return None if value is None else str(value)


# --- setting up the socket --------------------------------------------------------------------


async def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``: parent created, stale file removed, mode 0660."""
    if _existing_socket(path):
        if await _is_served(path):
            raise ControlSocketError(f"another process is serving {path}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("removed a stale control socket", path=str(path))
    return _bind(path)


def _existing_socket(path: Path) -> bool:
    """True when a socket file is in the way; creates the parent; refuses any other file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise ControlSocketError(f"{path} exists and is not a socket; not touching it")
    return True


async def _is_served(path: Path) -> bool:
    """True when some process accepts connections on ``path`` (a live daemon, not a stale file)."""
    try:
        async with asyncio.timeout(2.0):
            _reader, writer = await asyncio.open_unix_connection(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # a full backlog: someone is there
    writer.close()
    return True


def _bind(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)  # before listen(): nobody connects while it is wider
        _chown_to_service_group(path)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _chown_to_service_group(path: Path) -> None:
    try:
        gid = grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return  # no service group on this machine (development, tests): keep ours
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        log.warning("cannot give the control socket to its group", group=SERVICE_GROUP)


async def install(gw: Gateway, stack: AsyncExitStack) -> None:
    """Serve the control socket when ``control.enabled``; a socket that cannot be made only logs."""
    cfg = gw.config.control
    if not cfg.enabled:
        return
    path = Path(cfg.socket)
    try:
        sock = await bind_socket(path)
    except (ControlSocketError, OSError) as err:
        log.error(
            "control socket unavailable; gatewayctl cannot reach this daemon",
            path=str(path),
            error=str(err),
        )
        return
    server = ControlServer(gw, sock)
    stack.callback(server.close)
    from gateway.app import Supervised  # noqa: PLC0415 - keeps gatewayctl's imports light

    gw.components.append(Supervised("control", server))
