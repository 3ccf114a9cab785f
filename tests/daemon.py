"""The daemon as a real subprocess: config files, start/stop/kill, sd_notify capture."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomlkit

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    """Write a raw config dict as TOML."""
    path.write_text(tomlkit.dumps(raw))
    return path


class NotifySocket:
    """A fake systemd NOTIFY_SOCKET that records datagrams in order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def read_until(self, needle: str, timeout_s: float = 15.0) -> list[str]:
        """Collect datagrams until one contains ``needle``; returns all collected so far."""
        deadline = time.monotonic() + timeout_s
        while not any(needle in m for m in self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {needle!r} in {self.messages}")
            self.sock.settimeout(left)
            self.messages.append(self.sock.recv(4096).decode())
        return self.messages

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


class Daemon:
    """``store-gateway run`` in a subprocess."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.log = config.parent / "daemon.log"
        self._offset = 0

    def start(self, **extra_env: str) -> Daemon:
        """Start the daemon (stdout/stderr to a log file)."""
        env = {**self.env, **extra_env}
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
            )
        return self

    def wait_log(self, needle: str, timeout_s: float = 15.0) -> None:
        """Wait until the log contains ``needle`` (or the process dies)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log.exists() and needle in self.log.read_text()[self._offset :]:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            time.sleep(0.05)
        raise TimeoutError(f"{needle!r} not in log:\n{self.log.read_text()[-3000:]}")

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait(self, timeout_s: float = 30.0) -> int:
        """Wait for the process to end on its own."""
        assert self.proc is not None
        return self.proc.wait(timeout_s)


def run_once(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``store-gateway`` to completion (for exit-code tests)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=30,
        check=False,
    )
