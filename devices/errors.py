"""Device errors; they hang below ``gateway.errors.GatewayError`` (see the tree there)."""

from __future__ import annotations

from gateway.errors import GatewayError, RetryableError


class DeviceError(GatewayError):
    """A device did something other than what we asked."""


class DeviceUnavailable(DeviceError, RetryableError):
    """Port missing, link lost or device silent: retry with backoff, report offline."""


class DeviceTimeout(DeviceUnavailable):
    """No answer within the protocol timeout."""


class DeviceProtocolError(DeviceError):
    """Bytes that do not parse: discard, count, resynchronise on the next frame."""


class DeviceRejected(DeviceError):
    """The device answered with an error code (ZVT 84 xx, Modbus exception)."""

    def __init__(self, message: str, *, code: int) -> None:
        self.code = code
        super().__init__(f"{message} (code 0x{code:02X})")
