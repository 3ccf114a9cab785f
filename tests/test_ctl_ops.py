"""``gatewayctl`` operations against a running daemon and a stopped one: status, devices,
devices discover, locker/payment actions, outbox stats/list; exit codes 0/1/2/69."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import ctl_ops
from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.control import ActionError
from gateway.ctl import Context, main
from gateway.discovery import Discovery
from tests.conftest import make_config_dict
from tests.daemon import REPO, Daemon, write_config
from tests.gwharness import emit, running_gateway
from tests.test_discovery import _multicast_problem

PT = {"id": "pt-1", "endpoint": "socket://127.0.0.1:9", "pos_terminals": ["pos-1"]}
BANK = {
    "id": "A",
    "endpoint": "socket://127.0.0.1:9",
    "compartments": [{"number": 1, "size": "S", "unit": 1, "channel": 0}],
}


@pytest.fixture(autouse=True)
def _quiet_daemon(log_output: list[dict[str, Any]]) -> None:
    """The in-process daemon logs to the same stdout gatewayctl prints to: capture its logs."""


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("STORE_GATEWAY"):
            monkeypatch.delenv(name)


@pytest.fixture
def raw(tmp_path: Path) -> dict[str, Any]:
    return make_config_dict(
        tmp_path, "mqtt://127.0.0.1:9", "mqtt://127.0.0.1:9", payment_terminals=[PT]
    )


@pytest.fixture
def cfg_path(tmp_path: Path, raw: dict[str, Any]) -> Path:
    return write_config(tmp_path / "gw.toml", raw)


@pytest.fixture
def config(config_factory: Callable[..., GatewayConfig]) -> GatewayConfig:
    return config_factory(payment_terminals=[PT])


@pytest.fixture
async def gw(config: GatewayConfig) -> AsyncIterator[Gateway]:
    async with running_gateway(config) as gateway:
        yield gateway


class Ctl:
    """gatewayctl in-process (in a thread, so an in-process daemon keeps serving)."""

    def __init__(self, cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.cfg_path = cfg_path
        self.capsys = capsys
        self.out = ""
        self.err = ""

    async def __call__(self, *args: str) -> int:
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, ["--config", str(self.cfg_path), *args])
        captured = self.capsys.readouterr()
        self.out, self.err = captured.out, captured.err
        return code

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def ctl(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> Ctl:
    return Ctl(cfg_path, capsys)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- against a running daemon -----------------------------------------------------------------


async def test_status_running(gw: Gateway, ctl: Ctl) -> None:
    seqs = await emit(gw, 4)
    assert await ctl("status", "--json") == 0
    report = ctl.json()
    assert report["daemon"] == "running"
    assert {"cloud", "store_bus", "outbox", "devices", "disk", "clock"} <= set(report)
    assert report["cloud"] == {"state": "disconnected", "connected_since": None}
    assert report["store_bus"] == {"state": "disconnected"}
    assert report["outbox"]["pending"] == len(seqs) and report["outbox"]["last_acked_seq"] == 0
    assert report["disk"]["free_bytes"] > 0 and report["disk"]["db_bytes"] > 0
    assert report["clock"] == "synced"
    assert report["gateway"]["pid"] == os.getpid()
    assert await ctl("status") == 0
    assert "running (pid" in ctl.out and "4 pending" in ctl.out
    assert "pt-1" in ctl.out and "payment" in ctl.out


async def test_devices_running(gw: Gateway, ctl: Ctl) -> None:
    assert await ctl("devices", "--json") == 0
    listed = ctl.json()
    assert listed["daemon"] == "running"
    assert [d["device_id"] for d in listed["devices"]] == ["pt-1"]
    assert await ctl("devices") == 0
    header, row = ctl.out.splitlines()[:2]
    assert header.split() == ["DEVICE", "KIND", "STATE", "ENDPOINT"]
    assert row.split()[0:2] == ["pt-1", "payment"]
    assert row.index("payment") == header.index("KIND")  # aligned columns


async def test_outbox_stats_and_list_running(gw: Gateway, ctl: Ctl) -> None:
    seqs = await emit(gw, 5, "test.outbox")
    gw.outbox.ack(seqs[1])
    assert await ctl("outbox", "stats", "--json") == 0
    stats = ctl.json()
    assert (stats["pending"], stats["last_acked_seq"], stats["last_seq"]) == (3, seqs[1], seqs[-1])
    assert await ctl("outbox", "list", "--limit", "2", "--json") == 0
    assert [e["seq"] for e in ctl.json()["events"]] == seqs[2:4]
    assert await ctl("outbox", "list") == 0
    lines = ctl.out.splitlines()
    assert lines[0].split()[:2] == ["SEQ", "TYPE"] and len(lines) == 1 + 3
    assert all("test.outbox" in line and "pending" in line for line in lines[1:])


async def test_locker_open_goes_through_the_daemon_with_the_uid(gw: Gateway, ctl: Ctl) -> None:
    calls: list[tuple[dict[str, Any], int]] = []

    async def locker_open(args: dict[str, Any], uid: int) -> dict[str, Any]:
        calls.append((args, uid))
        if args["compartment"] == 99:
            raise ActionError("unknown-compartment", "bank A has no compartment 99")
        return {"bank": args["bank"], "compartment": args["compartment"], "seq": 7}

    gw.actions["locker.open"] = locker_open
    assert await ctl("locker", "open", "A", "1") == 0
    assert calls == [({"bank": "A", "compartment": 1}, os.getuid())]
    assert "compartment" in ctl.out and "seq" in ctl.out
    assert await ctl("locker", "open", "A", "99") == 1
    assert "bank A has no compartment 99" in ctl.err
    assert await ctl("locker", "open", "A", "one") == 2  # usage: not a number


async def test_payment_status_and_resolve_go_through_the_daemon(gw: Gateway, ctl: Ctl) -> None:
    seen: dict[str, dict[str, Any]] = {}

    async def status(args: dict[str, Any], _uid: int) -> dict[str, Any]:
        seen["status"] = args
        return {"device": args["device_id"], "state": "idle"}

    async def resolve(args: dict[str, Any], _uid: int) -> dict[str, Any]:
        seen["resolve"] = args
        return {"request_id": args["request_id"], "status": args["status"], "seq": 9}

    gw.actions.update({"payment.status": status, "payment.resolve": resolve})
    assert await ctl("payment", "status", "pt-1", "--json") == 0
    assert ctl.json() == {"device": "pt-1", "state": "idle"}
    assert await ctl("payment", "resolve", "r-17", "approved") == 0
    assert seen["resolve"] == {"request_id": "r-17", "status": "approved"}
    assert await ctl("payment", "resolve", "r-17", "maybe") == 2


async def test_an_action_the_daemon_does_not_offer_exits_1(gw: Gateway, ctl: Ctl) -> None:
    gw.actions.pop("payment.status", None)  # as on a gateway without payment terminals
    assert await ctl("payment", "status", "pt-1") == 1
    assert "does not offer 'payment.status'" in ctl.err


async def test_devices_discover_lists_this_gateway(
    config_factory: Callable[..., GatewayConfig], ctl: Ctl
) -> None:
    problem = _multicast_problem()
    if problem:
        pytest.skip(problem)
    config = config_factory(discovery={"enabled": True}, store={"id": "store-0777"})
    async with running_gateway(config) as gw:
        discovery = next(s.component for s in gw.components if s.name == "discovery")
        assert isinstance(discovery, Discovery)
        async with asyncio.timeout(10):
            await discovery.wait_until(lambda: discovery.advertised is not None)
        assert await ctl("devices", "discover", "--timeout", "1.5", "--json") == 0
        found = ctl.json()
        assert any(g["store_id"] == "store-0777" for g in found["gateways"])
        assert await ctl("devices", "discover", "--timeout", "1") == 0
        assert "store-0777" in ctl.out and ctl.out.splitlines()[0].split()[:2] == ["KIND", "NAME"]
    assert await ctl("devices", "discover", "--timeout", "0") == 2


# --- against a stopped daemon -----------------------------------------------------------------


@pytest.fixture
async def stopped_db(config: GatewayConfig) -> tuple[list[int], int]:
    """A database left by a daemon that committed 6 events and saw 2 of them acked."""
    async with running_gateway(config) as gw:
        seqs = await emit(gw, 6, "test.offline")
        gw.outbox.ack(seqs[1])
    return seqs, seqs[1]


async def test_status_stopped_exits_69_with_the_database_figures(
    stopped_db: tuple[list[int], int], ctl: Ctl, config: GatewayConfig
) -> None:
    seqs, acked = stopped_db
    db_path = Path(config.storage.path)
    before = sha256(db_path)
    assert await ctl("status", "--json") == 69
    report = ctl.json()
    assert report["daemon"] == "stopped"
    assert report["cloud"] is None and report["store_bus"] is None and report["devices"] is None
    outbox = report["outbox"]
    assert outbox["pending"] == len(seqs) - 2 and outbox["unacked"] == 0
    assert outbox["last_acked_seq"] == acked and outbox["oldest_pending_age_s"] >= 0
    assert report["disk"]["db_bytes"] > 0 and report["disk"]["free_bytes"] > 0
    assert report["clock"] == "synced"
    assert "daemon not running" in ctl.err
    assert await ctl("status") == 69
    assert "NOT RUNNING" in ctl.out and "4 pending" in ctl.out
    assert sha256(db_path) == before  # opened read-only


async def test_outbox_stats_and_list_stopped_read_the_database(
    stopped_db: tuple[list[int], int], ctl: Ctl
) -> None:
    seqs, acked = stopped_db
    assert await ctl("outbox", "stats", "--json") == 0
    stats = ctl.json()
    assert (stats["pending"], stats["unacked"], stats["last_acked_seq"], stats["last_seq"]) == (
        len(seqs) - 2,
        0,
        acked,
        seqs[-1],
    )
    assert "daemon not running" in ctl.err
    assert await ctl("outbox", "list", "--limit", "3", "--json") == 0
    events = ctl.json()["events"]
    assert [e["seq"] for e in events] == seqs[2:5]
    assert {e["type"] for e in events} == {"test.offline"}
    assert all(e["state"] == "pending" and e["occurred_at"] for e in events)


async def test_offline_figures_match_the_daemons(config: GatewayConfig, ctl: Ctl) -> None:
    async with running_gateway(config) as gw:
        seqs = await emit(gw, 3)
        gw.outbox.ack(seqs[0])
        await gw.outbox.persist()
        assert await ctl("outbox", "stats", "--json") == 0
        live = ctl.json()
    assert await ctl("outbox", "stats", "--json") == 0
    offline = ctl.json()
    keys = ("pending", "unacked", "last_acked_seq", "last_seq")
    assert {k: offline[k] for k in keys} == {k: live[k] for k in keys}


async def test_devices_stopped_come_from_the_configuration(
    config_factory: Callable[..., GatewayConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = make_config_dict(
        tmp_path,
        "mqtt://127.0.0.1:9",
        "mqtt://127.0.0.1:9",
        payment_terminals=[PT],
        locker_banks=[BANK],
    )
    ctl = Ctl(write_config(tmp_path / "gw2.toml", raw), capsys)
    assert await ctl("devices", "--json") == 0
    listed = ctl.json()
    assert listed["daemon"] == "stopped"
    assert [(d["device_id"], d["kind"], d["state"]) for d in listed["devices"]] == [
        ("pt-1", "payment", "unknown"),
        ("A", "locker", "unknown"),
    ]
    assert "daemon not running" in ctl.err


@pytest.mark.parametrize(
    "args",
    [
        ("locker", "open", "A", "1"),
        ("payment", "status", "pt-1"),
        ("payment", "resolve", "r-1", "failed"),
    ],
)
async def test_device_actions_exit_69_while_stopped(ctl: Ctl, args: tuple[str, ...]) -> None:
    assert await ctl(*args) == 69
    assert "daemon not running" in ctl.err
    assert "Traceback" not in ctl.err


async def test_a_stale_socket_means_not_running(ctl: Ctl, config: GatewayConfig) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(config.control.socket))
    stale.close()  # left behind by a killed daemon: connect() is refused
    assert await ctl("locker", "open", "A", "1") == 69
    assert await ctl("status", "--json") == 69
    assert ctl.json()["outbox"] is None  # and there is no database either
    assert "no database" in ctl.err


async def test_control_disabled_reads_the_database(
    tmp_path: Path, raw: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    raw["control"]["enabled"] = False
    ctl = Ctl(write_config(tmp_path / "gw3.toml", raw), capsys)
    assert await ctl("status") == 69
    assert "control.enabled = false" in ctl.err


# --- the real thing: daemon and gatewayctl as processes ---------------------------------------


def gatewayctl(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.ctl", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=30,
        check=False,
    )


def test_subprocess_status_running_then_stopped(cfg_path: Path) -> None:
    daemon = Daemon(cfg_path)
    try:
        daemon.start()
        daemon.wait_log("control socket listening")
        result = gatewayctl(cfg_path, "status", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["daemon"] == "running"
        assert daemon.proc is not None and report["gateway"]["pid"] == daemon.proc.pid
        assert gatewayctl(cfg_path, "outbox", "stats").returncode == 0
        assert daemon.terminate() == 0
        result = gatewayctl(cfg_path, "status", "--json")
        assert result.returncode == 69
        assert json.loads(result.stdout)["daemon"] == "stopped"
        result = gatewayctl(cfg_path, "payment", "status", "pt-1")
        assert result.returncode == 69 and "daemon not running" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        daemon.kill()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_discover_shows_progress_on_a_terminal_only(tmp_path: Path) -> None:
    problem = _multicast_problem()
    if problem:
        pytest.skip(problem)
    tty, out = _Terminal(), io.StringIO()
    ctx = Context(tmp_path / "unused.toml", out, tty)
    args = argparse.Namespace(timeout=0.6, json=False)
    assert await asyncio.to_thread(ctl_ops.devices_discover, ctx, args) == 0
    assert "listening for gateways and brokers" in tty.getvalue()
    assert tty.getvalue().endswith("\r\033[K")  # the progress line is wiped at the end
    piped = io.StringIO()
    ctx = Context(tmp_path / "unused.toml", io.StringIO(), piped)
    assert await asyncio.to_thread(ctl_ops.devices_discover, ctx, args) == 0
    assert piped.getvalue() == ""
