"""sd_notify by hand (SdNotifier) and the shipped systemd unit (directives, verify, security)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.sdnotify import SdNotifier

UNIT_PATH = Path(__file__).resolve().parents[1] / "systemd" / "store-gateway.service"
RECV_TIMEOUT_S = 2.0
MAX_EXPOSURE = 2.0

Unit = dict[str, list[tuple[str, str]]]


def _receive(sock: socket.socket) -> str:
    """One datagram from the fake service manager, bounded by RECV_TIMEOUT_S."""
    sock.settimeout(RECV_TIMEOUT_S)
    return sock.recv(4096).decode()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A fake service manager: a bound datagram socket and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify.sock"
    assert len(os.fsencode(path)) < 108, "sun_path limit; shorten the test name"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield sock, str(path)


@pytest.fixture
def abstract_manager() -> Iterator[tuple[socket.socket, str]]:
    """A fake service manager on an abstract-namespace socket ('@name' in NOTIFY_SOCKET)."""
    name = f"store-gateway-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield sock, "@" + name


# --- (a) SdNotifier -------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["manager", "abstract_manager"])
def test_lifecycle_messages_arrive_in_order(which: str, request: pytest.FixtureRequest) -> None:
    sock, address = request.getfixturevalue(which)
    with SdNotifier(environ={"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.enabled
        assert notifier.ready()
        assert notifier.status("cloud connected, 3 pending")
        assert notifier.watchdog()
        assert notifier.stopping()
    received = [_receive(sock) for _ in range(4)]
    assert received == [
        "READY=1\n",
        "STATUS=cloud connected, 3 pending\n",
        "WATCHDOG=1\n",
        "STOPPING=1\n",
    ]


def test_notify_sends_all_fields_in_one_datagram(manager: tuple[socket.socket, str]) -> None:
    sock, address = manager
    with SdNotifier(environ={"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.notify(READY=1, STATUS="up", MAINPID=4242)
    assert _receive(sock) == "READY=1\nSTATUS=up\nMAINPID=4242\n"


def test_status_is_flattened_to_one_line(manager: tuple[socket.socket, str]) -> None:
    sock, address = manager
    with SdNotifier(environ={"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.status("cloud down\n12 pending")
    assert _receive(sock) == "STATUS=cloud down 12 pending\n"


@pytest.mark.parametrize(
    "fields", [{"STATUS": "two\nlines"}, {"BAD=KEY": "1"}, {"": "1"}, {"SPACE KEY": "1"}]
)
def test_notify_rejects_malformed_fields(fields: dict[str, str]) -> None:
    with SdNotifier(environ={}) as notifier, pytest.raises(ValueError, match="sd_notify"):
        notifier.notify(**fields)


def test_unset_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*_args: object, **_kwargs: object) -> socket.socket:
        raise AssertionError("no socket may be opened without NOTIFY_SOCKET")

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setattr(socket, "socket", no_socket)
    with capture_logs() as logs, SdNotifier() as notifier:
        assert not notifier.enabled
        assert not notifier.ready()
        assert not notifier.status("x")
        assert not notifier.watchdog()
        assert not notifier.stopping()
    assert logs == []


def test_reads_os_environ_by_default(
    manager: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = manager
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with SdNotifier() as notifier:
        assert notifier.ready()
    assert _receive(sock) == "READY=1\n"


def test_missing_socket_logs_once_and_never_raises(tmp_path: Path) -> None:
    address = str(tmp_path / "missing.sock")
    with capture_logs() as logs, SdNotifier(environ={"NOTIFY_SOCKET": address}) as notifier:
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    failures = [entry for entry in logs if entry["event"] == "sd_notify_failed"]
    assert len(failures) == 1
    assert failures[0]["errno"] == errno.ENOENT
    assert failures[0]["log_level"] == "warning"


def test_dead_socket_refused_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: ECONNREFUSED
    with capture_logs() as logs, SdNotifier(environ={"NOTIFY_SOCKET": str(path)}) as notifier:
        assert not notifier.watchdog()
        assert not notifier.watchdog()
        path.unlink()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as alive:
            alive.bind(str(path))
            assert notifier.watchdog()
            assert _receive(alive) == "WATCHDOG=1\n"
    assert [entry["event"] for entry in logs] == ["sd_notify_failed", "sd_notify_recovered"]
    assert logs[0]["errno"] == errno.ECONNREFUSED


@pytest.mark.timeout(10)
def test_full_receive_queue_does_not_block(manager: tuple[socket.socket, str]) -> None:
    _sock, address = manager  # never read: the kernel queue fills up
    with capture_logs() as logs, SdNotifier(environ={"NOTIFY_SOCKET": address}) as notifier:
        results = [notifier.watchdog() for _ in range(2000)]
    assert results[0]
    assert not all(results), "a blocking socket would have hung here instead"
    assert [entry["errno"] for entry in logs if entry["event"] == "sd_notify_failed"] == [
        errno.EAGAIN
    ]


def test_context_manager_closes_the_socket(
    manager: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[socket.socket] = []
    real_socket = socket.socket

    def recording_socket(*args: int) -> socket.socket:
        sock = real_socket(*args)
        opened.append(sock)
        return sock

    _sock, address = manager
    monkeypatch.setattr(socket, "socket", recording_socket)
    with SdNotifier(environ={"NOTIFY_SOCKET": address}) as notifier:
        assert notifier.ready()
        assert notifier.watchdog()
        assert len(opened) == 1
        assert opened[0].fileno() >= 0
        assert not opened[0].getblocking()
    assert opened[0].fileno() == -1


@pytest.mark.parametrize(
    ("environ", "expected_s"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "5000", "WATCHDOG_PID": "4242"}, 0.0025),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, None),
        ({}, None),
        ({"WATCHDOG_PID": "4242"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "thirty"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected_s: float | None) -> None:
    assert SdNotifier(environ=environ, pid=4242).watchdog_interval_s() == expected_s


def test_watchdog_interval_defaults_to_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert SdNotifier().watchdog_interval_s() == 1.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert SdNotifier().watchdog_interval_s() is None


# --- (b) the unit file ----------------------------------------------------------------------


def _parse_unit(text: str) -> Unit:
    """Sections of a unit file as ordered (key, value) lists; repeated keys are kept."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"directive outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line}"
        current.append((key.strip(), value.strip()))
    return sections


@pytest.fixture(scope="module")
def unit() -> Unit:
    """The shipped unit, parsed."""
    return _parse_unit(UNIT_PATH.read_text())


def _values(unit: Unit, key: str, section: str = "Service") -> list[str]:
    return [value for name, value in unit[section] if name == key]


def _one(unit: Unit, key: str, section: str = "Service") -> str:
    values = _values(unit, key, section)
    assert len(values) == 1, f"{key}= expected once, found {values}"
    return values[0]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecStart", "/usr/bin/store-gateway run --config /etc/store-gateway/gateway.toml"),
        ("WatchdogSec", "30"),
        ("Restart", "on-failure"),
        ("RestartSec", "2"),
        ("RestartPreventExitStatus", "78"),
        ("User", "store-gateway"),
        ("Group", "store-gateway"),
        ("SupplementaryGroups", "dialout"),
        ("StateDirectory", "store-gateway"),
        ("StateDirectoryMode", "0750"),
        ("RuntimeDirectory", "store-gateway"),
        ("RuntimeDirectoryMode", "0750"),
        ("RuntimeDirectoryPreserve", "no"),
        ("ConfigurationDirectory", "store-gateway"),
        ("DevicePolicy", "closed"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("CapabilityBoundingSet", ""),
        ("MemoryDenyWriteExecute", "yes"),
    ],
)
def test_unit_directive(unit: Unit, key: str, expected: str) -> None:
    assert _one(unit, key) == expected


def test_unit_config_env_matches_exec_start(unit: Unit) -> None:
    env = dict(
        item.split("=", 1) for value in _values(unit, "Environment") for item in value.split()
    )
    assert env["STORE_GATEWAY_CONFIG"] == "/etc/store-gateway/gateway.toml"
    assert _one(unit, "ExecStart").endswith("--config " + env["STORE_GATEWAY_CONFIG"])
    assert int(_one(unit, "TimeoutStopSec")) > 0
    assert _one(unit, "WantedBy", "Install") == "multi-user.target"


def test_unit_allows_serial_ports(unit: Unit) -> None:
    allowed = set(_values(unit, "DeviceAllow"))
    assert {"char-ttyUSB rw", "char-ttyACM rw", "char-ttyAMA rw"} <= allowed
    assert _values(unit, "PrivateDevices") in ([], ["no"])


def test_unit_allows_network_and_multicast(unit: Unit) -> None:
    families = set(_one(unit, "RestrictAddressFamilies").split())
    # AF_NETLINK: zeroconf's interface enumeration (getifaddrs) uses rtnetlink.
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    for key in ("PrivateNetwork", "IPAddressDeny", "RestrictNetworkInterfaces"):
        assert _values(unit, key) in ([], ["no"]), f"{key} would cut off the LAN or multicast"


def test_unit_lets_the_daemon_read_ntp_status(unit: Unit) -> None:
    """clock.synced=auto reads adjtimex; ProtectClock= or a later ~@clock would forbid it."""
    assert _values(unit, "ProtectClock") in ([], ["no"])
    filters = _values(unit, "SystemCallFilter")
    reallowed = max(i for i, value in enumerate(filters) if "clock_adjtime" in value.split())
    denied = [i for i, value in enumerate(filters) if value.startswith("~")]
    assert all(i < reallowed for i in denied), "a deny list after the re-allow wins"
    assert {"adjtimex", "clock_adjtime", "clock_adjtime64"} <= set(filters[reallowed].split())


def test_unit_watchdog_feeds_sdnotifier(unit: Unit) -> None:
    usec = int(_one(unit, "WatchdogSec")) * 1_000_000
    interval_s = SdNotifier(environ={"WATCHDOG_USEC": str(usec)}).watchdog_interval_s()
    assert interval_s == 15.0


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed")
    return found


def _run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "cat", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        [_systemd_analyze(), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=30,
        check=False,
    )


def test_systemd_analyze_verify_clean(tmp_path: Path) -> None:
    """verify the unit with ExecStart pointed at an existing binary; nothing else may be reported.

    The shipped ExecStart (/usr/bin/store-gateway) exists only where the package is installed,
    so verify would rightly report it as missing; everything else is checked as shipped.
    """
    true_bin = shutil.which("true")
    assert true_bin is not None
    shipped = UNIT_PATH.read_text()
    copy = tmp_path / UNIT_PATH.name
    copy.write_text(shipped.replace("ExecStart=/usr/bin/store-gateway ", f"ExecStart={true_bin} "))
    assert copy.read_text() != shipped
    result = _run_analyze("verify", str(copy))
    assert result.returncode == 0, result.stderr + result.stdout
    assert UNIT_PATH.name not in result.stderr + result.stdout


def test_systemd_analyze_verify_only_misses_the_binary() -> None:
    result = _run_analyze("verify", str(UNIT_PATH))
    if result.returncode == 0:
        return  # the package is installed on this machine
    complaints = [line for line in result.stderr.splitlines() if line.strip()]
    assert complaints, result.stdout
    assert all("/usr/bin/store-gateway" in line for line in complaints), complaints


def test_systemd_analyze_security_exposure() -> None:
    result = _run_analyze("security", "--offline=true", "--no-pager", str(UNIT_PATH))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match is not None, output
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, output
