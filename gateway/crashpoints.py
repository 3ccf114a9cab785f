"""Named crash points for the fault-tolerance suite.

``STORE_GATEWAY_CRASH_AT=name[,name…]`` makes the process SIGKILL itself the first time it
reaches one of the named points (optionally ``name@N`` for the N-th time). Unset in production,
where :func:`crash_point` is one dict lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "STORE_GATEWAY_CRASH_AT"


def _parse(spec: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, nth = item.partition("@")
        points[name] = int(nth) if nth.isdigit() else 1
    return points


_points = _parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process here when the environment names this point."""
    if name not in _points:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == _points[name]:
        os.kill(os.getpid(), signal.SIGKILL)


def reload_from_env() -> None:
    """Re-read the environment (tests that set the variable after import)."""
    _points.clear()
    _points.update(_parse(os.environ.get(ENV, "")))
    _hits.clear()
