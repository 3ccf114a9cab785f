"""Explicit state of every link and device, changed in one place and observed by health."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field


class LinkState(enum.StrEnum):
    """What a link or device is doing now; the values are the wire words of health/status."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


class DeviceState(enum.StrEnum):
    """Device state as sent in ``device.status`` and ``health``."""

    ONLINE = "online"
    OFFLINE = "offline"
    ERROR = "error"


Listener = Callable[[str, str], None]


@dataclass(slots=True)
class StateCell:
    """Holds one state value; ``set`` is the only way to change it and notifies listeners."""

    name: str
    value: str
    listeners: list[Listener] = field(default_factory=list)

    def set(self, value: str) -> bool:
        """Change the state; returns True (and notifies) only when it actually changed."""
        if value == self.value:
            return False
        self.value = value
        for listener in list(self.listeners):
            listener(self.name, value)
        return True
