"""``gatewayctl`` operations: status, devices, LAN discovery, device actions, outbox figures.

Everything that needs the daemon goes through its control socket (:mod:`gateway.control`).
Read-only commands fall back to the database, opened read-only, when the daemon is down:
``status`` then exits 69 (the daemon is what it reports on), ``devices`` and ``outbox …`` exit 0
with a note on stderr. Device actions (``locker open``, ``payment status|resolve``) exit 69
when the daemon is not running and 1 with the daemon's message when it refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.clock import ClockStatus
from gateway.config import GatewayConfig, load_config
from gateway.control import OUTBOX_LIST_SQL, configured_devices, encode, outbox_entries
from gateway.ctl import GROUPS, Context, CtlError, ExitCode, command

if TYPE_CHECKING:
    from gateway.discovery import Sighting

CALL_TIMEOUT_S = 90.0
DISCOVER_TIMEOUT_S = 3.0

GROUPS.update(
    {
        ("devices",): "configured devices with their state",
        ("locker",): "locker technician actions (through the daemon)",
        ("payment",): "payment terminal technician actions (through the daemon)",
        ("outbox",): "event queue figures (read-only; work while the daemon is down)",
    }
)


class DaemonUnavailable(CtlError):
    """The daemon is not running (no socket, or nobody accepts on it): exit 69."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.UNAVAILABLE)


@dataclass(frozen=True, slots=True)
class ControlClient:
    """A blocking client of the control socket: one request, one reply per call."""

    path: Path
    timeout_s: float = CALL_TIMEOUT_S

    def call(self, action: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """The action's result; DaemonUnavailable (69) or CtlError (1) otherwise."""
        line = self._exchange(encode({"id": 1, "action": action, "args": args or {}}))
        try:
            reply = json.loads(line)
        except ValueError as err:
            raise CtlError(f"the daemon sent something that is not JSON: {err}") from err
        if reply.get("ok") is True and isinstance(reply.get("result"), dict):
            return dict(reply["result"])
        error = reply.get("error") or {}
        code, message = error.get("code", "?"), error.get("message", "no message")
        if code == "unknown-action":
            raise CtlError(f"the daemon does not offer {action!r} (is that service configured?)")
        raise CtlError(f"{action}: {message} ({code})")

    def _exchange(self, request: bytes) -> bytes:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout_s)
                sock.connect(str(self.path))
                sock.sendall(request)
                with sock.makefile("rb") as stream:
                    line = stream.readline()
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonUnavailable(
                f"daemon not running (nothing listens on {self.path})"
            ) from None
        except PermissionError:
            raise CtlError(
                f"not allowed to use {self.path}: run as root or as a member of group store-gateway"
            ) from None
        except TimeoutError:
            raise CtlError(f"the daemon did not answer within {self.timeout_s:g} s") from None
        except OSError as err:
            raise CtlError(f"control socket {self.path}: {err.strerror or err}") from None
        if not line.endswith(b"\n"):
            raise CtlError("the daemon closed the connection without a complete reply")
        return line


def _config(ctx: Context) -> GatewayConfig:
    config, warnings = load_config(ctx.config_path, check_secrets=False)
    for warning in warnings:
        ctx.warn(f"warning: {warning}")
    return config


def _client(config: GatewayConfig) -> ControlClient:
    if not config.control.enabled:
        raise DaemonUnavailable("the control socket is disabled (control.enabled = false)")
    return ControlClient(Path(config.control.socket))


# --- reading the database while the daemon is down --------------------------------------------


class OfflineDatabase:
    """The daemon's database opened read-only (sqlite ``mode=ro``); never writes or migrates."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise CtlError(f"no database at {path}")
        self.path = path
        try:
            self._conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as err:
            self.close()
            raise CtlError(f"cannot read database {path}: {err}") from None
        self.last_seq = int(meta.get("last_seq", 0))
        self.acked = int(meta.get("acked_through", 0))
        self.sent = min(max(int(meta.get("sent_through", 0)), self.acked), self.last_seq)

    def close(self) -> None:
        """Close the connection."""
        if getattr(self, "_conn", None) is not None:
            self._conn.close()

    def outbox_stats(self) -> dict[str, Any]:
        """The ``outbox`` figures as the health message has them (plus ``last_seq``)."""
        age: float | None = None
        if self.last_seq > self.sent:
            row = self._query("SELECT created_at FROM events WHERE seq = ?", (self.sent + 1,))
            if row:
                age = round(max(0.0, time.time() - float(row[0][0])), 3)
        return {
            "pending": self.last_seq - self.sent,
            "unacked": self.sent - self.acked,
            "oldest_pending_age_s": age,
            "last_acked_seq": self.acked,
            "last_seq": self.last_seq,
        }

    def outbox_list(self, limit: int) -> list[dict[str, Any]]:
        """The oldest events not yet acknowledged, as ``outbox.list`` returns them."""
        rows = self._query(OUTBOX_LIST_SQL, (self.acked, limit))
        return outbox_entries(rows, sent_through=self.sent, now=time.time())

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            return [tuple(r) for r in self._conn.execute(sql, params).fetchall()]
        except sqlite3.Error as err:
            raise CtlError(f"cannot read database {self.path}: {err}") from None


def _disk(db_path: Path) -> dict[str, Any]:
    existing = next((p for p in (db_path.parent, *db_path.parents) if p.exists()), Path("/"))
    st = os.statvfs(existing)
    db_bytes = sum(
        Path(f"{db_path}{suffix}").stat().st_size
        for suffix in ("", "-wal")
        if Path(f"{db_path}{suffix}").exists()
    )
    return {"free_bytes": st.f_bavail * st.f_frsize, "db_bytes": db_bytes}


def offline_status(ctx: Context, config: GatewayConfig) -> dict[str, Any]:
    """``status`` while the daemon is down: what the database, the disk and the clock tell."""
    path = Path(config.storage.path)
    try:
        db = OfflineDatabase(path)
    except CtlError as err:
        ctx.warn(f"gatewayctl: {err}")
        outbox = None
    else:
        try:
            outbox = db.outbox_stats()
        finally:
            db.close()
    return {
        "daemon": "stopped",
        "cloud": None,
        "store_bus": None,
        "outbox": outbox,
        "devices": None,
        "disk": _disk(path),
        "clock": ClockStatus(config.clock.synced).label(),
        "gateway": {
            "version": __version__,
            "store_id": config.store.id,
            "pid": None,
            "boot_id": None,
            "uptime_s": None,
            "config": str(ctx.config_path),
            "database": str(path),
        },
    }


# --- status and devices -----------------------------------------------------------------------


def _json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")


@command(
    "status",
    summary="daemon, links, outbox, devices, disk, clock; exit 69 when the daemon is down",
    arguments=_json_argument,
)
def status(ctx: Context, args: argparse.Namespace) -> int:
    """Live status from the daemon, or the database's figures and exit 69 when it is down."""
    config = _config(ctx)
    down: str | None = None
    try:
        live = _client(config).call("status")
    except DaemonUnavailable as err:
        report, down = offline_status(ctx, config), str(err)
    else:
        keys = ("cloud", "store_bus", "outbox", "devices", "disk", "clock", "gateway", "discovery")
        report = {"daemon": "running"} | {k: live[k] for k in keys if k in live}
        report["gateway"] = (report.get("gateway") or {}) | {"config": str(ctx.config_path)}
    if args.json:
        ctx.say(json.dumps(report, indent=2))
    else:
        ctx.out.write(render_status(report, config))
    if down is not None:
        ctx.warn(f"gatewayctl: {down}; figures read from the database")
        return ExitCode.UNAVAILABLE
    return ExitCode.OK


def render_status(report: dict[str, Any], config: GatewayConfig) -> str:
    """``status`` for people: aligned label/value lines, then the device table."""
    info = report.get("gateway") or {}
    if report["daemon"] == "running":
        daemon = (
            f"running (pid {info.get('pid')}, up {_duration(info.get('uptime_s'))}, "
            f"version {info.get('version')})"
        )
    else:
        daemon = "NOT RUNNING"
    lines = [
        ("daemon", daemon),
        ("store", str(info.get("store_id", config.store.id))),
        ("cloud", _link(report.get("cloud"))),
        ("store bus", _link(report.get("store_bus"))),
        ("outbox", _outbox_line(report.get("outbox"))),
        ("disk", _disk_line(report.get("disk"))),
        ("clock", str(report.get("clock"))),
    ]
    if (discovery := report.get("discovery")) is not None:
        lines.append(("discovery", _discovery_line(discovery)))
    text = _pairs(lines)
    if report["daemon"] == "running":
        devices = configured_devices(config, report.get("devices"))
        text += "\n" + _device_table(devices)
    return text


def _device_table(devices: list[dict[str, Any]]) -> str:
    if not devices:
        return "no devices configured\n"
    rows = [[d["device_id"], d["kind"], d["state"], d.get("endpoint") or ""] for d in devices]
    return table(["DEVICE", "KIND", "STATE", "ENDPOINT"], rows)


@command("devices", summary="configured devices with their state", arguments=_json_argument)
def devices(ctx: Context, args: argparse.Namespace) -> int:
    """Devices with live states, or from the configuration with state ``unknown``."""
    config = _config(ctx)
    try:
        rows = list(_client(config).call("devices")["devices"])
        daemon = "running"
    except DaemonUnavailable as err:
        rows, daemon = configured_devices(config), "stopped"
        ctx.warn(f"gatewayctl: {err}; states unknown")
    if args.json:
        ctx.say(json.dumps({"daemon": daemon, "devices": rows}, indent=2))
    else:
        ctx.out.write(_device_table(rows))
    return ExitCode.OK


# --- LAN discovery ----------------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError("must be between 0 and 600 seconds")
    return value


def _discover_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DISCOVER_TIMEOUT_S,
        metavar="S",
        help=f"how long to listen (default {DISCOVER_TIMEOUT_S:g} s)",
    )
    _json_argument(parser)


@command(
    "devices",
    "discover",
    summary="gateways and MQTT brokers seen on the LAN through zeroconf",
    arguments=_discover_arguments,
)
def devices_discover(ctx: Context, args: argparse.Namespace) -> int:
    """Browse the LAN for ``--timeout`` seconds and list what answered."""
    progress = _progress_line(ctx) if ctx.err.isatty() and not args.json else None
    found = asyncio.run(_browse(args.timeout, progress))
    if progress is not None:
        ctx.err.write("\r\033[K")
    items = sorted((s.as_dict() for s in found), key=lambda d: (d["kind"], d["name"]))
    gateways = [d for d in items if d["kind"] == "gateway"]
    brokers = [d for d in items if d["kind"] == "mqtt"]
    if args.json:
        ctx.say(json.dumps({"gateways": gateways, "brokers": brokers}, indent=2))
        return ExitCode.OK
    if not items:
        ctx.say(f"nothing found in {args.timeout:g} s")
        return ExitCode.OK
    rows = [
        [
            "gateway" if d["kind"] == "gateway" else "mqtt broker",
            d["name"].split("._")[0],
            d["store_id"] or "",
            ", ".join(d["addresses"]),
            "" if d["port"] is None else str(d["port"]),
            d["version"] or "",
        ]
        for d in items
    ]
    ctx.out.write(table(["KIND", "NAME", "STORE", "ADDRESS", "PORT", "VERSION"], rows))
    for store_id in sorted({g["store_id"] for g in gateways if g["store_id"]}):
        count = sum(1 for g in gateways if g["store_id"] == store_id)
        if count > 1:
            ctx.warn(f"warning: {count} gateways announce store {store_id}")
    return ExitCode.OK


async def _browse(
    timeout_s: float, progress: Callable[[float, int], None] | None
) -> list[Sighting]:
    """Browse for ``timeout_s`` seconds from this process; CtlError when zeroconf cannot start."""
    from gateway import discovery  # noqa: PLC0415 - zeroconf is loaded only for this command

    try:
        aiozc = discovery.open_zeroconf()
    except discovery.ZEROCONF_FAILURES as err:
        raise CtlError(f"zeroconf unavailable (no multicast on this machine?): {err}") from err
    browser = discovery.LanBrowser(aiozc)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    stopper = loop.call_at(deadline, browser.request_stop)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(browser.run(), name="browse")
            if progress is not None:
                tg.create_task(_tick(deadline, lambda: len(browser.sightings), progress))
    finally:
        stopper.cancel()
        await aiozc.async_close()
    return list(browser.sightings.values())


async def _tick(
    deadline: float, count: Callable[[], int], show: Callable[[float, int], None]
) -> None:
    """Refresh the progress line four times a second until the deadline."""
    loop = asyncio.get_running_loop()
    while (left := deadline - loop.time()) > 0:
        show(left, count())
        await asyncio.sleep(min(0.25, left))


def _progress_line(ctx: Context) -> Callable[[float, int], None]:
    def show(left_s: float, found: int) -> None:
        ctx.err.write(f"\r\033[Klistening for gateways and brokers… {left_s:4.1f} s, {found} found")
        ctx.err.flush()

    return show


# --- device actions through the daemon --------------------------------------------------------


def _locker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bank", metavar="BANK", help="locker bank id")
    parser.add_argument("compartment", metavar="COMPARTMENT", type=int, help="compartment number")
    _json_argument(parser)


@command(
    "locker",
    "open",
    summary="technician test: pulse one lock (a locker.opened event, by: technician)",
    arguments=_locker_arguments,
)
def locker_open(ctx: Context, args: argparse.Namespace) -> int:
    """Ask the daemon to pulse one lock."""
    return _action(ctx, args, "locker.open", {"bank": args.bank, "compartment": args.compartment})


def _payment_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("device", metavar="DEVICE", help="payment terminal id")
    _json_argument(parser)


@command(
    "payment",
    "status",
    summary="run a ZVT status enquiry through the daemon",
    arguments=_payment_status_arguments,
)
def payment_status(ctx: Context, args: argparse.Namespace) -> int:
    """Ask the daemon for a status enquiry on one terminal."""
    # the payments service names the argument device_id (as health and device.status do)
    return _action(ctx, args, "payment.status", {"device_id": args.device})


def _payment_resolve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "request_id", metavar="REQUEST_ID", help="the in_doubt payment's request id"
    )
    parser.add_argument(
        "status", choices=["approved", "failed"], help="the terminal journal's verdict"
    )
    _json_argument(parser)


@command(
    "payment",
    "resolve",
    summary="settle an in_doubt payment after checking the terminal's journal",
    arguments=_payment_resolve_arguments,
)
def payment_resolve(ctx: Context, args: argparse.Namespace) -> int:
    """Ask the daemon to record the final status of an in_doubt payment."""
    return _action(
        ctx, args, "payment.resolve", {"request_id": args.request_id, "status": args.status}
    )


def _action(ctx: Context, args: argparse.Namespace, action: str, params: dict[str, Any]) -> int:
    result = _client(_config(ctx)).call(action, params)
    if args.json:
        ctx.say(json.dumps(result, indent=2))
    else:
        ctx.out.write(_pairs([(k, _plain(v)) for k, v in result.items()]) or "done\n")
    return ExitCode.OK


# --- outbox -----------------------------------------------------------------------------------


@command(
    "outbox",
    "stats",
    summary="pending, unacked, oldest age, last acked seq",
    arguments=_json_argument,
)
def outbox_stats(ctx: Context, args: argparse.Namespace) -> int:
    """Queue figures from the daemon, or from the database while it is down."""
    config = _config(ctx)
    try:
        stats = _client(config).call("outbox.stats")
    except DaemonUnavailable as err:
        ctx.warn(f"gatewayctl: {err}; figures read from the database")
        db = OfflineDatabase(Path(config.storage.path))
        try:
            stats = db.outbox_stats()
        finally:
            db.close()
    if args.json:
        ctx.say(json.dumps(stats, indent=2))
    else:
        ctx.out.write(
            _pairs(
                [
                    ("pending", str(stats["pending"])),
                    ("unacked", str(stats["unacked"])),
                    ("oldest pending", _age(stats["oldest_pending_age_s"])),
                    ("last acked seq", str(stats["last_acked_seq"])),
                    ("last seq", str(stats.get("last_seq", "?"))),
                ]
            )
        )
    return ExitCode.OK


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit", type=int, default=20, metavar="N", help="how many events (1..1000, default 20)"
    )
    _json_argument(parser)


@command(
    "outbox",
    "list",
    summary="the oldest events not yet acknowledged by the cloud",
    arguments=_list_arguments,
)
def outbox_list(ctx: Context, args: argparse.Namespace) -> int:
    """The oldest unacknowledged events, from the daemon or from the database."""
    if not 1 <= args.limit <= 1000:
        raise CtlError("--limit must be between 1 and 1000", ExitCode.USAGE)
    config = _config(ctx)
    try:
        events = list(_client(config).call("outbox.list", {"limit": args.limit})["events"])
    except DaemonUnavailable as err:
        ctx.warn(f"gatewayctl: {err}; events read from the database")
        db = OfflineDatabase(Path(config.storage.path))
        try:
            events = db.outbox_list(args.limit)
        finally:
            db.close()
    if args.json:
        ctx.say(json.dumps({"events": events}, indent=2))
    elif not events:
        ctx.say("no unacknowledged events")
    else:
        rows = [
            [str(e["seq"]), e["type"], e["occurred_at"] or "", _age(e["age_s"]), e["state"]]
            for e in events
        ]
        ctx.out.write(table(["SEQ", "TYPE", "OCCURRED AT", "AGE", "STATE"], rows))
    return ExitCode.OK


# --- presentation -----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, header first."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [headers, *rows]
    ]
    return "\n".join(lines) + "\n"


def _pairs(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    width = max(len(k) for k, _ in pairs)
    return "".join(f"{k.ljust(width)}  {v}\n" for k, v in pairs)


def _plain(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return "-" if value is None else str(value)


def _link(link: dict[str, Any] | None) -> str:
    if link is None:
        return "unknown (daemon not running)"
    state = str(link.get("state"))
    since = link.get("connected_since")
    return f"{state} since {since}" if since else state


def _outbox_line(outbox: dict[str, Any] | None) -> str:
    if outbox is None:
        return "unknown (no database)"
    return (
        f"{outbox['pending']} pending, {outbox['unacked']} unacked, "
        f"oldest {_age(outbox['oldest_pending_age_s'])}, last acked seq {outbox['last_acked_seq']}"
    )


def _disk_line(disk: dict[str, Any] | None) -> str:
    if disk is None:
        return "unknown"
    return f"{_bytes(disk['free_bytes'])} free, database {_bytes(disk['db_bytes'])}"


def _discovery_line(discovery: dict[str, Any]) -> str:
    state = str(discovery.get("state"))
    if state == "duplicate-store-id":
        names = ", ".join(d["name"].split("._")[0] for d in discovery.get("duplicates", []))
        return f"ALERT: another gateway announces this store id ({names})"
    seen = (
        f"{discovery.get('other_gateways', 0)} other gateways, "
        f"{discovery.get('brokers', 0)} brokers seen"
    )
    return (
        f"{state}; {seen}" if state == "ok" else f"{state} {discovery.get('detail') or ''}".strip()
    )


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else _duration(seconds)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    if s < 86400:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    return f"{int(s // 86400)} d {int(s % 86400 // 3600)} h"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
