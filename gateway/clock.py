"""Time, identifiers and whether the system clock can be trusted."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import secrets
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Literal

_TIME_ERROR = 5  # adjtimex(2) return value while STA_UNSYNC is set
_TIMESYNC_MARKER = Path("/run/systemd/timesync/synchronized")
_last_ms = 0
_last_seq = 0


def now_rfc3339() -> str:
    """Current UTC time as RFC 3339 with milliseconds and ``Z``."""
    return format_rfc3339(time.time())


_prefix_cache: tuple[int, str] = (-1, "")


def format_rfc3339(ts: float) -> str:
    """A POSIX timestamp as RFC 3339 UTC with milliseconds (hot path: prefix cached per second)."""
    global _prefix_cache  # noqa: PLW0603 - a one-entry cache on the event hot path
    whole = int(ts // 1)
    micros = round((ts - whole) * 1_000_000)  # as datetime rounds, so both agree
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    if _prefix_cache[0] != whole:
        _prefix_cache = (whole, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(whole)))
    return f"{_prefix_cache[1]}{micros // 1000:03d}Z"


def parse_rfc3339(text: str) -> float:
    """An RFC 3339 time (``Z`` or offset) as a POSIX timestamp; ValueError when malformed."""
    if not isinstance(text, str) or "T" not in text.upper():
        raise ValueError("not an RFC 3339 time")
    dt = datetime.fromisoformat(text.replace("z", "Z"))
    if dt.tzinfo is None:
        raise ValueError("RFC 3339 time needs a zone (Z or +hh:mm)")
    return dt.timestamp()


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48-bit ms timestamp, then a counter+random; monotonic in-process."""
    global _last_ms, _last_seq  # noqa: PLW0603 - process-wide monotonic state, by design
    ms = time.time_ns() // 1_000_000
    if ms <= _last_ms:
        ms = _last_ms
        _last_seq += 1
    else:
        _last_seq = secrets.randbits(10)
    _last_ms = ms
    rand_a = _last_seq & 0xFFF
    rand_b = secrets.randbits(62)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_boot_id() -> str:
    """An id that changes on every process start."""
    return uuid.uuid4().hex


class _Timex(ctypes.Structure):
    # struct timex is ~208 bytes on 64-bit Linux; only `modes` (first field) must be 0 to read.
    _fields_ = (("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 252))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")  # runs ldconfig: once per process, never per event
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def kernel_clock_synced() -> bool | None:
    """True/False from adjtimex(2) (not STA_UNSYNC); None when it cannot be asked."""
    libc = _libc()
    if libc is None:
        return None
    try:
        tx = _Timex()
        state = libc.adjtimex(ctypes.byref(tx))
    except AttributeError:
        return None
    if state < 0:
        return None
    return bool(state != _TIME_ERROR)


class ClockStatus:
    """Answers "is the clock known good?" per ``clock.synced`` (auto | yes | no)."""

    def __init__(
        self, mode: Literal["auto", "yes", "no"] = "auto", *, cache_s: float = 1.0
    ) -> None:
        self._mode = mode
        self._cache_s = cache_s
        self._checked_at = -cache_s
        self._synced = False

    def synced(self) -> bool:
        """True when the clock is trusted now (kernel asked at most once per ``cache_s``)."""
        if self._mode != "auto":
            return self._mode == "yes"
        now = time.monotonic()
        if now - self._checked_at >= self._cache_s:
            self._checked_at = now
            self._synced = bool(kernel_clock_synced()) or _TIMESYNC_MARKER.exists()
        return self._synced

    def label(self) -> Literal["synced", "unsynced"]:
        """The envelope's ``clock`` word."""
        return "synced" if self.synced() else "unsynced"


def monotonic_s() -> float:
    """Monotonic seconds (for timeouts and ages; never for event times)."""
    return time.monotonic()


def process_start_s() -> float:
    """Wall-clock time this process started (for uptime)."""
    return _START


_START = time.time()
