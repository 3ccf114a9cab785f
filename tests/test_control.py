"""The control socket: permissions, peer uid in the audit log, every built-in action, bad
requests, custom actions, and clients that are slow or silent not blocking anybody."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.control import MAX_LINE_BYTES, ActionError, ControlServer
from gateway.errors import LinkUnavailable
from tests.gwharness import emit, running_gateway

PT = {"id": "pt-1", "endpoint": "socket://127.0.0.1:9", "pos_terminals": ["pos-1"]}


class Client:
    """One raw connection to the control socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path) -> Client:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 22)
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout_s: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            line = await self.reader.readline()
        assert line.endswith(b"\n"), f"no complete reply: {line!r}"
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def call(self, action: str, req_id: Any = 1, **args: Any) -> dict[str, Any]:
        await self.send_raw(
            json.dumps({"id": req_id, "action": action, "args": args}).encode() + b"\n"
        )
        return await self.reply()

    async def at_eof(self, timeout_s: float = 5.0) -> bool:
        """True when the server closed the connection (EOF or reset) after any pending data."""
        async with asyncio.timeout(timeout_s):
            try:
                while await self.reader.read(1 << 16):
                    pass
            except ConnectionResetError:
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await self.writer.wait_closed()


@pytest.fixture
def config(config_factory: Callable[..., GatewayConfig]) -> GatewayConfig:
    return config_factory(payment_terminals=[PT])


@pytest.fixture
async def gw(config: GatewayConfig) -> AsyncIterator[Gateway]:
    async with running_gateway(config) as gateway:
        yield gateway


@pytest.fixture
async def client(gw: Gateway) -> AsyncIterator[Client]:
    c = await Client.connect(gw.config.control.socket)
    yield c
    await c.close()


def server_of(gw: Gateway) -> ControlServer:
    comp = next(s.component for s in gw.components if s.name == "control")
    assert isinstance(comp, ControlServer)
    return comp


# --- the socket file --------------------------------------------------------------------------


async def test_socket_mode_0660_and_removed_on_stop(config: GatewayConfig) -> None:
    path = Path(config.control.socket)
    async with running_gateway(config):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
    with pytest.raises(FileNotFoundError):
        os.stat(path)


async def test_parent_created_and_stale_socket_replaced(
    config_factory: Callable[..., GatewayConfig], tmp_path: Path
) -> None:
    path = tmp_path / "run" / "sub" / "control.sock"
    stale = socket.socket(socket.AF_UNIX)
    path.parent.mkdir(parents=True)
    stale.bind(str(path))
    stale.close()  # the file stays; nobody listens: what a SIGKILLed daemon leaves
    async with running_gateway(config_factory(control={"socket": str(path)})):
        c = await Client.connect(path)
        assert (await c.call("outbox.stats"))["ok"] is True
        await c.close()


async def test_a_foreign_file_is_left_alone_and_the_daemon_still_runs(
    config_factory: Callable[..., GatewayConfig], tmp_path: Path, log_output: list[dict[str, Any]]
) -> None:
    path = tmp_path / "control.sock"
    path.write_text("not a socket")
    async with running_gateway(config_factory()) as gw:
        assert not any(s.name == "control" for s in gw.components)
    assert path.read_text() == "not a socket"
    assert any(e["event"].startswith("control socket unavailable") for e in log_output)


async def test_a_second_daemon_on_the_same_socket_does_not_steal_it(
    gw: Gateway, config_factory: Callable[..., GatewayConfig], tmp_path: Path
) -> None:
    other = config_factory(storage={"path": str(tmp_path / "other" / "g.db")})
    async with running_gateway(other) as second:
        assert not any(s.name == "control" for s in second.components)
    c = await Client.connect(gw.config.control.socket)  # the first one's socket survived
    assert (await c.call("status"))["ok"] is True
    await c.close()


# --- built-in actions -------------------------------------------------------------------------


async def test_status_has_the_health_figures_and_daemon_info(gw: Gateway, client: Client) -> None:
    reply = await client.call("status", req_id="s-1")
    assert reply["id"] == "s-1" and reply["ok"] is True
    result = reply["result"]
    for key in ("outbox", "cloud", "store_bus", "devices", "disk", "clock", "boot_id"):
        assert key in result
    assert result["cloud"]["state"] == "disconnected"
    assert result["gateway"]["pid"] == os.getpid()
    assert result["gateway"]["boot_id"] == gw.boot_id
    assert result["gateway"]["store_id"] == "store-0042"


async def test_outbox_stats_and_list(gw: Gateway, client: Client) -> None:
    seqs = await emit(gw, 5, "test.thing")
    stats = (await client.call("outbox.stats"))["result"]
    assert stats["pending"] == 5 and stats["last_seq"] == seqs[-1] and stats["last_acked_seq"] == 0
    assert stats["oldest_pending_age_s"] is not None
    listed = (await client.call("outbox.list", limit=3))["result"]["events"]
    assert [e["seq"] for e in listed] == seqs[:3]
    assert {e["type"] for e in listed} == {"test.thing"}
    assert all(e["state"] == "pending" and e["occurred_at"].endswith("Z") for e in listed)
    gw.outbox.ack(seqs[1])
    listed = (await client.call("outbox.list"))["result"]["events"]
    assert [e["seq"] for e in listed] == seqs[2:]


async def test_devices_lists_configured_devices(client: Client) -> None:
    devices = (await client.call("devices"))["result"]["devices"]
    pt = next(d for d in devices if d["device_id"] == "pt-1")
    assert pt["kind"] == "payment" and pt["endpoint"] == "socket://127.0.0.1:9"
    assert isinstance(pt["state"], str)


async def test_peer_uid_is_in_the_audit_lines(
    client: Client, log_output: list[dict[str, Any]]
) -> None:
    await client.call("outbox.list", limit=2)
    audit = [e for e in log_output if e["event"] == "control action"]
    assert audit[-1]["uid"] == os.getuid()
    assert audit[-1]["pid"] == os.getpid()
    assert audit[-1]["args"] == {"limit": 2} and audit[-1]["read_only"] is True
    done = [e for e in log_output if e["event"] == "control action done"]
    assert done[-1]["action"] == "outbox.list" and done[-1]["ok"] is True


# --- bad requests: an error reply, and the same connection keeps working -----------------------


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"this is not json\n", "bad-json"),
        (b"\xff\xfe\n", "bad-json"),
        (b"[1, 2]\n", "bad-request"),
        (b'"status"\n', "bad-request"),
        (b'{"id": 7}\n', "bad-request"),
        (b'{"id": 7, "action": "status", "args": [], "x": 1}\n', "bad-request"),
        (b'{"id": 7, "action": "no.such.thing"}\n', "unknown-action"),
        (b'{"id": 7, "action": "outbox.list", "args": {"limit": 0}}\n', "bad-args"),
        (b'{"id": 7, "action": "outbox.list", "args": {"limit": "many"}}\n', "bad-args"),
        (b'{"id": 7, "action": "status", "args": {"verbose": true}}\n', "bad-args"),
    ],
)
async def test_bad_requests_get_an_error_and_the_connection_stays(
    client: Client, line: bytes, code: str
) -> None:
    await client.send_raw(line)
    reply = await client.reply()
    assert reply["ok"] is False and reply["error"]["code"] == code
    assert reply["error"]["message"]
    if b'"id": 7' in line:
        assert reply["id"] == 7
    assert (await client.call("outbox.stats", req_id=8))["ok"] is True


async def test_oversized_line_is_refused_and_the_connection_closed(
    gw: Gateway, client: Client
) -> None:
    await client.send_raw(b'{"id": 1, "action": "status", "pad": "' + b"x" * MAX_LINE_BYTES)
    reply = await client.reply()
    assert reply["error"]["code"] == "too-large"
    assert await client.at_eof()
    fresh = await Client.connect(gw.config.control.socket)
    assert (await fresh.call("status"))["ok"] is True
    await fresh.close()


async def test_a_last_request_without_newline_is_answered(client: Client) -> None:
    await client.send_raw(b'{"id": 3, "action": "outbox.stats"}')
    client.writer.write_eof()
    assert (await client.reply())["id"] == 3


# --- custom actions ---------------------------------------------------------------------------


async def test_registered_actions_get_args_and_uid(gw: Gateway, client: Client) -> None:
    calls: list[tuple[dict[str, Any], int]] = []

    async def echo(args: dict[str, Any], uid: int) -> dict[str, Any]:
        calls.append((args, uid))
        return {"echo": args, "uid": uid}

    gw.actions["test.echo"] = echo
    reply = await client.call("test.echo", bank="A", compartment=3)
    assert reply["ok"] is True
    assert reply["result"] == {"echo": {"bank": "A", "compartment": 3}, "uid": os.getuid()}
    assert calls == [({"bank": "A", "compartment": 3}, os.getuid())]


async def test_action_failures_become_error_codes(
    gw: Gateway, client: Client, log_output: list[dict[str, Any]]
) -> None:
    async def refuse(_args: dict[str, Any], _uid: int) -> dict[str, Any]:
        raise ActionError("no-such-compartment", "bank A has no compartment 99")

    async def bad(_args: dict[str, Any], _uid: int) -> dict[str, Any]:
        raise ValueError("status must be approved or failed")

    async def offline(_args: dict[str, Any], _uid: int) -> dict[str, Any]:
        raise LinkUnavailable("terminal pt-1 is offline")

    async def buggy(args: dict[str, Any], _uid: int) -> dict[str, Any]:
        return {"value": args["missing"]}  # a KeyError: a bug, not a bad argument

    async def says_no(_args: dict[str, Any], _uid: int) -> dict[str, Any]:
        return {"ok": False, "error": {"code": "not-in-doubt", "message": "settled meanwhile"}}

    async def slow(_args: dict[str, Any], _uid: int) -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    gw.actions.update(
        {
            "t.refuse": refuse,
            "t.bad": bad,
            "t.offline": offline,
            "t.bug": buggy,
            "t.slow": slow,
            "t.says_no": says_no,
        }
    )
    server_of(gw).action_timeout_s = 0.2
    expected = {
        "t.refuse": "no-such-compartment",
        "t.bad": "bad-args",
        "t.offline": "unavailable",
        "t.bug": "internal",
        "t.slow": "timeout",
        "t.says_no": "not-in-doubt",
    }
    for action, code in expected.items():
        reply = await client.call(action)
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert any(e["event"] == "control action crashed" for e in log_output)
    assert (await client.call("status"))["ok"] is True


# --- slow, silent and too many clients --------------------------------------------------------


async def test_a_silent_client_does_not_block_another_and_is_closed_when_idle(gw: Gateway) -> None:
    server_of(gw).idle_timeout_s = 0.3
    silent = await Client.connect(gw.config.control.socket)
    talker = await Client.connect(gw.config.control.socket)
    assert (await talker.call("status"))["ok"] is True
    assert await silent.at_eof(timeout_s=3)
    await silent.close()
    await talker.close()


async def test_a_client_that_stops_reading_is_dropped_and_blocks_nobody(
    gw: Gateway, log_output: list[dict[str, Any]]
) -> None:
    server = server_of(gw)
    server.write_timeout_s = 0.3
    await emit(gw, 1000)
    # a plain socket nobody reads from (an asyncio client would keep draining it into memory)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.connect(str(gw.config.control.socket))
    stuck.setblocking(False)
    request = b'{"id": 1, "action": "outbox.list", "args": {"limit": 1000}}\n'
    stuck.sendall(request * 40)  # ~4 MB of replies
    other = await Client.connect(gw.config.control.socket)
    for _ in range(5):
        assert (await other.call("outbox.stats"))["result"]["pending"] == 1000
    async with asyncio.timeout(5):
        while not any("does not read" in e["event"] for e in log_output):  # noqa: ASYNC110 - bounded
            await asyncio.sleep(0.05)
    assert (await other.call("status"))["ok"] is True
    received = 0
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5):
        try:
            while chunk := await loop.sock_recv(stuck, 1 << 16):
                received += len(chunk)
        except ConnectionResetError:
            pass  # aborted with replies still queued: the kernel may say reset instead of EOF
    assert received < 40 * 100_000  # it was cut off, not served in full
    stuck.close()
    await other.close()


async def test_connections_beyond_the_bound_are_refused_busy(gw: Gateway) -> None:
    server_of(gw).max_connections = 2
    held = [await Client.connect(gw.config.control.socket) for _ in range(2)]
    for c in held:
        assert (await c.call("outbox.stats"))["ok"] is True
    extra = await Client.connect(gw.config.control.socket)
    reply = await extra.reply()
    assert reply["error"]["code"] == "busy"
    assert await extra.at_eof()
    await held[0].close()
    async with asyncio.timeout(5):
        while server_of(gw)._connections >= 2:  # noqa: ASYNC110 - bounded; waits for the close
            await asyncio.sleep(0.02)
    again = await Client.connect(gw.config.control.socket)
    assert (await again.call("outbox.stats"))["ok"] is True
    for c in (held[1], extra, again):
        await c.close()


async def test_shutdown_closes_connected_clients(config: GatewayConfig) -> None:
    async with running_gateway(config) as gw:
        idle = await Client.connect(gw.config.control.socket)
        assert (await idle.call("outbox.stats"))["ok"] is True
    assert await idle.at_eof(timeout_s=1)
    await idle.close()
