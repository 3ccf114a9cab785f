"""The explicit registry of business services the composition root installs, in start order.

Each entry is ``async def install(gw: Gateway, stack: AsyncExitStack) -> None``: it creates its
resources on the stack, registers its store-bus routes and cloud commands, and appends its
long-lived loops to ``gw.components`` (stopped in reverse order, before the links).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.app import Gateway

Installer = Callable[["Gateway", AsyncExitStack], Awaitable[None]]


def installers() -> tuple[Installer, ...]:
    """The services, in start order (imported here so the registry is one explicit list)."""
    from gateway import control, discovery, inventory_sync, lockers, payments, pos  # noqa: PLC0415 - the registry is this one function

    return (
        control.install,
        discovery.install,
        pos.install,
        inventory_sync.install,
        lockers.install,
        payments.install,
    )
