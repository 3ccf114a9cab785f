"""The transport seam: an endpoint string becomes an asyncio stream pair.

``/dev/tty…`` and ``/dev/pts/N`` open a serial line (pyserial-asyncio-fast);
``socket://host:port`` and ``tcp://host:port`` open a TCP connection carrying the same bytes.
Whether the bytes are framed (serial ZVT) or bare (ZVT over TCP) is the driver's business:
see :func:`endpoint_kind`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from devices.errors import DeviceUnavailable


class EndpointKind(enum.StrEnum):
    """How an endpoint carries bytes."""

    SERIAL = "serial"  # a local serial line or pty
    SOCKET = "socket"  # socket://: a serial line tunnelled over TCP, same bytes
    TCP = "tcp"  # tcp://: a native TCP protocol (ZVT over TCP: bare APDUs)


@dataclass(frozen=True, slots=True)
class SerialParams:
    """Line settings; ignored for TCP endpoints."""

    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1


def endpoint_kind(endpoint: str) -> EndpointKind:
    """Classify an endpoint string; raises ValueError for anything else."""
    if endpoint.startswith("socket://"):
        _host_port(endpoint)
        return EndpointKind.SOCKET
    if endpoint.startswith("tcp://"):
        _host_port(endpoint)
        return EndpointKind.TCP
    if endpoint.startswith("/"):
        return EndpointKind.SERIAL
    raise ValueError(
        f"endpoint {endpoint!r}: expected a /dev path, socket://host:port or tcp://host:port"
    )


def _host_port(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError as err:
        raise ValueError(f"endpoint {endpoint!r}: bad port") from err
    if not parts.hostname or port is None:
        raise ValueError(f"endpoint {endpoint!r}: expected host:port")
    return parts.hostname, port


@contextlib.asynccontextmanager
async def open_endpoint(
    endpoint: str, params: SerialParams = SerialParams(), *, connect_timeout_s: float = 5.0
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Open the endpoint; closes it on exit. Failures raise DeviceUnavailable."""
    kind = endpoint_kind(endpoint)
    try:
        async with asyncio.timeout(connect_timeout_s):
            if kind is EndpointKind.SERIAL:
                reader, writer = await _open_serial(endpoint, params)
            else:
                host, port = _host_port(endpoint)
                reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as err:
        raise DeviceUnavailable(f"cannot open {endpoint}: {err}") from err
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def _open_serial(
    path: str, params: SerialParams
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    import serial  # noqa: PLC0415 - only serial endpoints need pyserial's C-free import cost
    import serial_asyncio_fast  # noqa: PLC0415

    try:
        reader, writer = await serial_asyncio_fast.open_serial_connection(
            url=path,
            baudrate=params.baudrate,
            bytesize=params.bytesize,
            parity=params.parity,
            stopbits=params.stopbits,
        )
    except serial.SerialException as err:
        raise OSError(str(err)) from err
    return reader, writer
