"""Process lifecycle helpers that must be importable before anything heavy."""

from __future__ import annotations

import signal


class EarlyStop:
    """Remembers a SIGTERM/SIGINT that arrives before the event loop takes the signals over."""

    requested = False

    @classmethod
    def install(cls) -> None:
        """Catch stop signals from process start on (systemd may stop us while starting)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, cls._handler)

    @classmethod
    def _handler(cls, _signum: int, _frame: object) -> None:
        cls.requested = True
