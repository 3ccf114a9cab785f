"""The gateway's error tree, split by what the caller should do.

::

    GatewayError
    ├── FatalError              stop: retrying cannot help
    │   ├── ConfigError         bad or unreadable configuration (exit 78)
    │   ├── DatabaseOpenError   the database cannot be created or opened (exit 73)
    │   ├── AlreadyRunning      another daemon holds the database (exit 73)
    │   └── AuthError           a peer refused our credentials (stop reconnecting)
    ├── RetryableError          try again later, with backoff
    │   ├── LinkUnavailable     an MQTT link or a device is not reachable
    │   │   └── LinkTimeout     ... or did not answer in time
    │   └── StorageError        a commit failed (disk full, I/O error); nothing was acknowledged
    │       └── StorageFull     the database reached storage.max_bytes or the disk reserve
    └── DeviceError             (devices.errors) a device said no or spoke garbage
        ├── DeviceUnavailable   (also RetryableError) port missing, link lost, silent device
        │   └── DeviceTimeout   no answer within the protocol timeout
        ├── DeviceProtocolError resync: bytes that do not parse
        └── DeviceRejected      the device answered with an error code

Library errors are wrapped at the boundary with ``raise ... from err``.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class FatalError(GatewayError):
    """Retrying cannot help; the operation (or the daemon) must stop."""


class RetryableError(GatewayError):
    """A transient condition; the caller retries with backoff."""


class ConfigError(FatalError):
    """Configuration invalid or unreadable; ``str()`` names file, key and problem."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        self.problem = message
        where = ": ".join(p for p in (path, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class DatabaseOpenError(FatalError):
    """The database file cannot be created or opened."""


class AlreadyRunning(DatabaseOpenError):
    """Another daemon already owns this database."""


class AuthError(FatalError):
    """A peer refused our credentials; reconnecting will not help until config changes."""


class LinkUnavailable(RetryableError):
    """A link (MQTT broker, device) is not reachable right now."""


class LinkTimeout(LinkUnavailable):
    """A link did not answer within its deadline."""


class StorageError(RetryableError):
    """A database commit failed; nothing in it was acknowledged to anyone."""


class StorageFull(StorageError):
    """The outbox reached its size bound or the disk's free-space reserve."""
