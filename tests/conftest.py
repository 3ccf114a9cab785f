"""Shared fixtures: real mosquitto brokers on free loopback ports, temp databases, configs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import pytest
import structlog

from gateway.config import GatewayConfig, parse_config
from gateway.db import Database

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, *, up: bool = True, timeout_s: float = 10.0) -> None:
    """Block until the port accepts (or refuses) connections; bounded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.02)
    raise TimeoutError(f"port {port} did not come {'up' if up else 'down'}")


class _BrokerProcess:
    """A broker subprocess on a fixed loopback port: start, SIGKILL, signal, restart (empty)."""

    exe: str | None = None
    protocol = "5"

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{type(self).__name__.lower()}-{self.port}.log"

    @property
    def url(self) -> str:
        """mqtt://127.0.0.1:port"""
        return f"mqtt://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Self:
        """Start (or restart, empty) on the same port; returns when it accepts connections."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self._argv(), stdout=log, stderr=log)
        wait_port(self.port)
        return self

    def kill(self) -> None:
        """SIGKILL: the broker loses everything it held."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def stop_signal(self, sig: int) -> None:
        """Send a signal (SIGSTOP/SIGCONT for half-open links)."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def restart(self) -> None:
        """Kill and start again, empty, on the same port."""
        self.kill()
        self.start()


class Broker(_BrokerProcess):
    """A real mosquitto process (no persistence: a restart is empty)."""

    def __init__(self, workdir: Path, *, extra_conf: str = "", port: int | None = None) -> None:
        super().__init__(workdir, port=port)
        self.extra_conf = extra_conf
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.protocol = "5"

    def _argv(self) -> list[str]:
        assert MOSQUITTO is not None
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_queued_messages 100000\n{self.extra_conf}\n"
        )
        return [MOSQUITTO, "-c", str(self.conf)]


NATS = shutil.which("nats-server")


class NatsBroker(_BrokerProcess):
    """NATS server's MQTT front end (JetStream on), the second broker implementation."""

    protocol = "3.1.1"  # nats-server 2.9 speaks MQTT 3.1.1 only

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.nats_port = free_port()
        self.store = workdir / f"nats-{self.port}"
        self.conf = workdir / f"nats-{self.port}.conf"

    def _argv(self) -> list[str]:
        assert NATS is not None
        shutil.rmtree(self.store, ignore_errors=True)  # restarts are empty, like mosquitto's
        self.conf.write_text(
            f"listen: 127.0.0.1:{self.nats_port}\nserver_name: n{self.port}\n"
            f'jetstream {{ store_dir: "{self.store}" }}\nmqtt {{ listen: 127.0.0.1:{self.port} }}\n'
        )
        return [NATS, "-c", str(self.conf)]


@pytest.fixture(params=["mosquitto-v5", "mosquitto-v3.1.1", "nats-v3.1.1"])
def any_cloud_broker(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Broker | NatsBroker]:
    """The cloud broker, once per implementation and protocol the gateway must work with."""
    kind, _, protocol = str(request.param).partition("-v")
    broker: Broker | NatsBroker
    if kind == "nats":
        if NATS is None:
            pytest.skip("nats-server is not installed (apt-get install nats-server)")
        broker = NatsBroker(tmp_path)
    else:
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        broker = Broker(tmp_path)
        broker.protocol = protocol
    broker.start()
    yield broker
    broker.kill()


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Start real mosquitto brokers; all are killed at teardown."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    made: list[Broker] = []

    def make(**kwargs: Any) -> Broker:
        b = Broker(tmp_path, **kwargs).start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.kill()


@pytest.fixture
def cloud_broker(broker_factory: Callable[..., Broker]) -> Broker:
    """The cloud side's broker."""
    return broker_factory()


@pytest.fixture
def store_broker(broker_factory: Callable[..., Broker]) -> Broker:
    """The store LAN's broker."""
    return broker_factory()


def make_config_dict(
    tmp_path: Path, cloud_url: str, store_url: str, **sections: Any
) -> dict[str, Any]:
    """A raw configuration with fast timings for tests."""
    raw: dict[str, Any] = {
        "schema_version": 1,
        "store": {"id": "store-0042"},
        "cloud": {
            "url": cloud_url,
            "keepalive_s": 5,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "resend_after_s": 2,
            "health_interval_s": 60,
        },
        "store_bus": {
            "url": store_url,
            "keepalive_s": 5,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
        },
        "storage": {"path": str(tmp_path / "state" / "gateway.db")},
        "clock": {"synced": "yes"},
        "control": {"socket": str(tmp_path / "control.sock")},
        "discovery": {"enabled": False},
        "logging": {"level": "info", "format": "json"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(name, {}).update(values)
        else:
            raw[name] = values
    return raw


@pytest.fixture
def config_factory(tmp_path: Path) -> Callable[..., GatewayConfig]:
    """Build a validated GatewayConfig for given broker URLs."""

    def make(
        cloud_url: str = "mqtt://127.0.0.1:1",
        store_url: str = "mqtt://127.0.0.1:1",
        **sections: Any,
    ) -> GatewayConfig:
        return parse_config(make_config_dict(tmp_path, cloud_url, store_url, **sections))

    return make


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    """An open database with its writer running."""
    async with Database(tmp_path / "g.db", store_id="store-0042", boot_id="boot-test") as database:
        writer = asyncio.get_running_loop().create_task(database.run())
        yield database
        database.request_stop()
        await writer


@pytest.fixture
def log_output() -> Iterator[list[dict[str, Any]]]:
    """Captured structlog entries."""
    with structlog.testing.capture_logs() as logs:
        yield logs


def python_cmd(*args: str) -> list[str]:
    """argv running a module with this interpreter (works without console scripts on PATH)."""
    return [sys.executable, *args]


@contextlib.contextmanager
def env_set(**values: str) -> Iterator[None]:
    """Temporarily set environment variables."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
