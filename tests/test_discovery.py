"""Zeroconf for real on loopback: advertisement, a second gateway, a broker, the duplicate-store
alert and its clearing, and failures that only warn. Skipped where multicast does not work."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from gateway import __version__
from gateway.config import GatewayConfig
from gateway.discovery import GATEWAY_TYPE, MQTT_TYPE, Discovery, Sighting
from tests.gwharness import running_gateway

LOOPBACK = "127.0.0.1"
WAIT_S = 10.0


def _multicast_problem() -> str | None:
    """Why multicast on loopback cannot work here, or None when a datagram makes the round trip."""
    group, port = "239.255.77.77", 0
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
        ):
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rx.bind(("", port))
            port = rx.getsockname()[1]
            mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(LOOPBACK))
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOOPBACK))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            tx.sendto(b"probe", (group, port))
            rx.settimeout(1.0)
            data, _ = rx.recvfrom(16)
    except OSError as err:
        return f"multicast on loopback is not available here: {err}"
    return None if data == b"probe" else "multicast probe came back garbled"


@pytest.fixture(scope="module", autouse=True)
def _needs_multicast() -> None:
    problem = _multicast_problem()
    if problem:
        pytest.skip(problem)


def gateway(store_id: str, instance: str, port: int = 1883) -> Discovery:
    """A Discovery on loopback only, so tests do not talk to the real LAN."""
    return Discovery(
        store_id=store_id,
        broker_host="10.0.0.5",
        broker_port=port,
        instance=instance,
        addresses=[LOOPBACK],
        interfaces=[LOOPBACK],
    )


@contextlib.asynccontextmanager
async def running(*discoveries: Discovery) -> AsyncIterator[None]:
    """Run the components; stop them (withdrawing the advertisements) on exit."""
    async with asyncio.TaskGroup() as tg:
        for d in discoveries:
            tg.create_task(d.run())
        try:
            yield
        finally:
            for d in discoveries:
                d.request_stop()


async def until(d: Discovery, predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        await d.wait_until(predicate)


def seen(d: Discovery, name_start: str) -> Sighting | None:
    return next((s for s in d.sightings() if s.name.startswith(name_start)), None)


@contextlib.asynccontextmanager
async def mqtt_broker_advert(instance: str) -> AsyncIterator[None]:
    """A plain ``_mqtt._tcp`` advertisement, as a broker appliance would announce itself."""
    aiozc = AsyncZeroconf(interfaces=[LOOPBACK])
    info = AsyncServiceInfo(
        MQTT_TYPE,
        f"{instance}.{MQTT_TYPE}",
        port=1883,
        server="broker-test.local.",
        parsed_addresses=[LOOPBACK],
    )
    try:
        await (await aiozc.async_register_service(info))
        yield
    finally:
        await aiozc.async_close()


async def test_finds_another_gateway_and_a_broker_with_their_txt() -> None:
    a = gateway("store-0042", "gw-a-find")
    b = gateway("store-0043", "gw-b-find", port=1884)
    async with running(a, b), mqtt_broker_advert("broker-find"):
        await until(a, lambda: bool(seen(a, "gw-b-find") and seen(a, "broker-find")))
        other = seen(a, "gw-b-find")
        assert other is not None and other.kind == "gateway"
        assert other.port == 1884 and LOOPBACK in other.addresses
        assert other.properties == {
            "store_id": "store-0043",
            "api": "v1",
            "version": __version__,
            "broker_host": "10.0.0.5",
            "broker_port": "1884",
        }
        broker = seen(a, "broker-find")
        assert broker is not None and broker.kind == "mqtt" and broker.port == 1883
        assert a.state == "ok" and not a.duplicates
        assert a.advertised == f"gw-a-find.{GATEWAY_TYPE}"
        listed = await a.list_action({}, 0)
        names = {s["name"] for s in listed["sightings"]}
        assert f"gw-b-find.{GATEWAY_TYPE}" in names and f"broker-find.{MQTT_TYPE}" in names
        assert a.health()["discovery"]["other_gateways"] >= 1


async def test_same_store_id_raises_the_duplicate_alert_until_the_other_leaves(
    log_output: list[dict[str, Any]],
) -> None:
    a = gateway("store-0042", "gw-a-dup")
    twin = gateway("store-0042", "gw-twin-dup")
    stranger = gateway("store-0099", "gw-stranger-dup")
    async with running(a, stranger):
        async with running(twin):
            await until(a, lambda: a.state == "duplicate-store-id")
            entry = a.health()["discovery"]
            assert [d["name"] for d in entry["duplicates"]] == [f"gw-twin-dup.{GATEWAY_TYPE}"]
            errors = [
                e for e in log_output if e["log_level"] == "error" and e["ours"] == a.advertised
            ]
            assert [e["name"] for e in errors] == [f"gw-twin-dup.{GATEWAY_TYPE}"]
            assert errors[0]["event"] == "another gateway advertises this store id"
            await until(a, lambda: seen(a, "gw-stranger-dup") is not None)
            assert set(a.duplicates) == {f"gw-twin-dup.{GATEWAY_TYPE}"}  # the stranger is fine
        await until(a, lambda: a.state == "ok")  # the twin's goodbye clears the alert
        assert a.health()["discovery"]["duplicates"] == []


# python-zeroconf leaks its listening socket when joining the group on a missing interface fails
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_no_usable_interface_degrades_to_a_warning(log_output: list[dict[str, Any]]) -> None:
    broken = Discovery(
        store_id="store-0042",
        broker_host="10.0.0.5",
        broker_port=1883,
        interfaces=["203.0.113.7"],  # not an address of this machine
    )
    async with running(broken):
        await until(broken, lambda: broken.state == "unavailable")
        assert broken.sightings() == []
        assert broken.health()["discovery"]["detail"]
    warnings = [e for e in log_output if e["log_level"] == "warning"]
    assert any("zeroconf unavailable" in e["event"] for e in warnings)
    gc.collect()  # let the leaked socket's warning surface here, under this test's filters


async def test_the_daemon_advertises_and_reports_discovery_in_health(
    config_factory: Callable[..., GatewayConfig],
) -> None:
    config = config_factory(discovery={"enabled": True, "advertise_host": "10.0.0.5"})
    async with running_gateway(config) as gw:
        discovery = next(s.component for s in gw.components if s.name == "discovery")
        assert isinstance(discovery, Discovery)
        await until(discovery, lambda: discovery.advertised is not None)
        assert discovery.broker_host == "10.0.0.5" and discovery.broker_port == 1
        health = await gw.health()
        assert health["discovery"]["state"] == "ok"
        assert health["discovery"]["advertised"].startswith("store-0042 on ")
        listed = await gw.actions["discovery.list"]({}, 0)
        assert listed["advertised"] == discovery.advertised
