"""A small loopback TCP proxy that injects network faults between the gateway and a broker.

Faults, switched at run time by the nemeses:

- ``delay_s``: every chunk is held this long before it is forwarded (order kept).
- :meth:`drop`: close every open connection with a FIN (the peer sees a clean EOF).
- :meth:`reset`: abort every open connection with an RST (``SO_LINGER`` 0).
- :meth:`blackhole`: stop forwarding in both directions and leave new connections unanswered.
  Bytes are held, not discarded — as TCP retransmits them once the path heals — so a stream
  that survives the outage is still a valid MQTT stream. A peer whose keepalive runs out first
  gives up on its own, which is the half-open case the gateway must detect.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

CHUNK = 65536


@dataclass(eq=False, slots=True)
class _Pair:
    """One proxied connection: the client side and the upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self, *, rst: bool = False) -> None:
        for writer in (self.client, self.upstream):
            if rst:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
            writer.close()


class FaultProxy:
    """``127.0.0.1:<port>`` → ``127.0.0.1:<upstream_port>`` with switchable faults."""

    def __init__(self, upstream_port: int, *, host: str = "127.0.0.1") -> None:
        self.upstream_port = upstream_port
        self.host = host
        self.port = 0
        self.delay_s = 0.0
        self.stats = {"connections": 0, "drops": 0, "resets": 0, "blackholes": 0}
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pairs: set[_Pair] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """mqtt://host:port of the proxy."""
        return f"mqtt://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._on_client, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._flowing.set()
        if self._server is not None:
            self._server.close()
        pairs = list(self._pairs)
        for pair in pairs:
            pair.close()
        async with asyncio.timeout(5):
            for pair in pairs:
                await pair.done.wait()
        if self._server is not None:
            await self._server.wait_closed()

    # --- faults -------------------------------------------------------------------------------

    def drop(self) -> None:
        """Close every connection cleanly (FIN)."""
        self.stats["drops"] += 1
        for pair in list(self._pairs):
            pair.close()

    def reset(self) -> None:
        """Abort every connection (RST)."""
        self.stats["resets"] += 1
        for pair in list(self._pairs):
            pair.close(rst=True)

    def blackhole(self, on: bool) -> None:
        """Hold all traffic (and new connections) while on; release it when off."""
        if on:
            self.stats["blackholes"] += 1
            self._flowing.clear()
        else:
            self._flowing.set()

    def heal(self) -> None:
        """No delay, traffic flowing."""
        self.delay_s = 0.0
        self._flowing.set()

    # --- forwarding ---------------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        try:
            await self._flowing.wait()  # a blackholed SYN: the client's connect times out
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            writer.close()
            return
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(reader, up_writer, pair), name="proxy-up")
                tg.create_task(self._pump(up_reader, writer, pair), name="proxy-down")
        finally:
            self._pairs.discard(pair)
            pair.close()
            pair.done.set()

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, pair: _Pair
    ) -> None:
        try:
            while data := await src.read(CHUNK):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            pair.close()  # one direction ended: the other ends too, as with a broken link
