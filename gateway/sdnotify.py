"""sd_notify(3) by hand: READY/STATUS/WATCHDOG/STOPPING datagrams to ``$NOTIFY_SOCKET``.

No python-systemd dependency: the protocol is one ``KEY=value`` per line in a single datagram
sent to an ``AF_UNIX``/``SOCK_DGRAM`` socket whose address systemd puts in ``NOTIFY_SOCKET``
(a file system path, or an abstract-namespace name written with a leading ``@``). When the
variable is unset (not started by systemd, or ``Type=simple``) every call is a silent no-op.
Sending never raises: a failure is logged once per outage and the daemon carries on, because a
missed notification must not take the store down (systemd's watchdog is the backstop).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from types import TracebackType
from typing import Self

import structlog

_log = structlog.get_logger(__name__)

_USEC_PER_S = 1_000_000


def _socket_address(raw: str) -> bytes | None:
    """Return the ``sendto`` address for a ``NOTIFY_SOCKET`` value, None when unusable."""
    if raw.startswith("@") and len(raw) > 1:
        # Abstract namespace: the kernel name starts with a NUL byte instead of '@'.
        return b"\0" + os.fsencode(raw[1:])
    if raw.startswith("/"):
        return os.fsencode(raw)
    return None  # empty, relative, or vsock:… (not used on our targets)


def _format_fields(fields: Mapping[str, str | int]) -> bytes:
    """Encode fields as the ``KEY=value\\n`` lines of one datagram; reject malformed ones."""
    lines = []
    for key, value in fields.items():
        text = str(value)
        if not key or not key.isascii() or not key.replace("_", "").isalnum():
            raise ValueError(f"invalid sd_notify field name {key!r}")
        if "\n" in text:
            raise ValueError(f"sd_notify field {key} must be one line")
        lines.append(f"{key}={text}\n")
    return "".join(lines).encode()


class SdNotifier:
    """Sends service-manager notifications; does nothing when ``NOTIFY_SOCKET`` is unset."""

    def __init__(self, environ: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        """Read ``NOTIFY_SOCKET``/``WATCHDOG_*`` from ``environ`` (default ``os.environ``)."""
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        self._pid = os.getpid() if pid is None else pid
        self._raw_address = self._environ.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(self._raw_address)
        self._sock: socket.socket | None = None
        self._failing = False
        if self._raw_address and self._address is None:
            _log.warning("sd_notify_unsupported_address", notify_socket=self._raw_address)

    @property
    def enabled(self) -> bool:
        """True when a usable ``NOTIFY_SOCKET`` was given."""
        return self._address is not None

    def ready(self) -> bool:
        """Tell systemd start-up finished (``READY=1``); True when the datagram was sent."""
        return self.notify(READY=1)

    def status(self, text: str) -> bool:
        """Set the one-line ``STATUS=`` shown by ``systemctl status``; newlines are flattened."""
        return self.notify(STATUS=" ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """Pet the watchdog (``WATCHDOG=1``)."""
        return self.notify(WATCHDOG=1)

    def stopping(self) -> bool:
        """Tell systemd shutdown has begun (``STOPPING=1``)."""
        return self.notify(STOPPING=1)

    def notify(self, **fields: str | int) -> bool:
        """Send ``fields`` as one datagram; True when sent, False when disabled or it failed."""
        payload = _format_fields(fields)
        if self._address is None or not payload:
            return False
        try:
            self._socket().sendto(payload, self._address)
        except OSError as err:
            if not self._failing:
                self._failing = True
                _log.warning(
                    "sd_notify_failed",
                    notify_socket=self._raw_address,
                    errno=err.errno,
                    error=os.strerror(err.errno) if err.errno else str(err),
                )
            return False
        if self._failing:
            self._failing = False
            _log.info("sd_notify_recovered", notify_socket=self._raw_address)
        return True

    def watchdog_interval_s(self) -> float | None:
        """Half of ``WATCHDOG_USEC`` in seconds when the watchdog is meant for us, else None."""
        watchdog_pid = self._environ.get("WATCHDOG_PID")
        if watchdog_pid is not None and watchdog_pid.strip() != str(self._pid):
            return None
        try:
            usec = int(self._environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / _USEC_PER_S / 2

    def close(self) -> None:
        """Close the socket; later notifications open a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        """Return self; the socket is opened on the first notification."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the socket."""
        self.close()

    def _socket(self) -> socket.socket:
        """Return the non-blocking datagram socket, creating it on first use."""
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)  # a full receive queue must not stall the event loop
            self._sock = sock
        return self._sock
