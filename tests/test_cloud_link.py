"""Cloud link end to end through real mosquitto brokers that are killed and restarted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

from gateway.backend_sim import RecordingBackend
from gateway.commands import Command, CommandSpec, Outcome
from gateway.config import GatewayConfig
from gateway.signing import public_key_b64
from tests.conftest import Broker, NatsBroker
from tests.gwharness import emit, running_gateway, wait_connected

pytestmark = pytest.mark.broker

ConfigFactory = Callable[..., GatewayConfig]
AnyBroker = Broker | NatsBroker


def cfg_for(
    factory: ConfigFactory, cloud: AnyBroker, store: Broker, **cloud_keys: Any
) -> GatewayConfig:
    """A config for this cloud broker implementation and protocol."""
    return factory(cloud.url, store.url, cloud={"protocol": cloud.protocol, **cloud_keys})


def backend(cloud: AnyBroker, **kwargs: Any) -> RecordingBackend:
    """A recording backend; on NATS it sends no commands (see test_commands_need_dotless_topics)."""
    if isinstance(cloud, NatsBroker):
        kwargs.setdefault("replay_on_reconnect", False)
    return RecordingBackend("127.0.0.1", cloud.port, "store-0042", **kwargs)


def skip_on_nats(cloud: AnyBroker) -> None:
    """nats-server 2.9 refuses MQTT topics containing '.', and command names contain dots."""
    if isinstance(cloud, NatsBroker):
        pytest.skip(
            "nats-server 2.9 refuses MQTT topics with '.' (commands/events.replay); NATS >= 2.10 maps them"
        )


def check_clean(record: Any, last_seq: int) -> None:
    """The backend saw every seq 1..last_seq, none changed, none reused."""
    assert record.gaps() == []
    assert max(record.events, default=0) >= last_seq
    assert record.changed_ids == []
    assert record.seq_reused == []


async def test_events_flow_in_order_and_are_acked(
    any_cloud_broker: AnyBroker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = cfg_for(config_factory, any_cloud_broker, store_broker)
    async with (
        running_gateway(cfg) as gw,
        backend(any_cloud_broker) as be,
    ):
        await wait_connected(gw)
        seqs = await emit(gw, 250)
        assert sorted(seqs) == list(range(1, 251))
        await be.wait_for_seq(250)
        await asyncio.wait_for(_until(lambda: gw.outbox.acked_through == 250), 10)
        env = be.record.events[1]
        assert set(env) == {
            "id",
            "seq",
            "type",
            "store_id",
            "occurred_at",
            "clock",
            "boot_id",
            "data",
        }
        assert (
            env["store_id"] == "store-0042"
            and env["clock"] == "synced"
            and env["boot_id"] == gw.boot_id
        )
        assert be.record.messages < 250  # batched
        check_clean(be.record, 250)
        stats = await gw.outbox.stats()
        assert (stats.pending, stats.unacked, stats.last_acked_seq) == (0, 0, 250)


async def _until(cond: Callable[[], bool]) -> None:
    while not cond():  # noqa: ASYNC110 - bounded by the caller's wait_for
        await asyncio.sleep(0.02)


async def test_broker_sigkill_mid_stream_loses_nothing(
    any_cloud_broker: AnyBroker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = cfg_for(config_factory, any_cloud_broker, store_broker, max_inflight=5, max_batch=10)
    async with (
        running_gateway(cfg) as gw,
        backend(any_cloud_broker) as be,
    ):
        await wait_connected(gw)
        producer = asyncio.create_task(emit(gw, 3000))
        await be.wait_until(lambda r: r.contiguous >= 200)
        any_cloud_broker.kill()
        await asyncio.sleep(0.3)
        more = await emit(gw, 200)  # committed while the cloud is down
        any_cloud_broker.start()
        await producer
        await be.wait_for_seq(3200, timeout_s=30)
        assert max(more) == 3200
        check_clean(be.record, 3200)
        await asyncio.wait_for(_until(lambda: gw.outbox.acked_through >= 3200), 15)


async def test_broker_restarted_empty_while_backend_not_acking(
    any_cloud_broker: AnyBroker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    """Broker PUBACK is not durability: events survive a broker that forgets everything."""
    cfg = cfg_for(config_factory, any_cloud_broker, store_broker)
    async with running_gateway(cfg) as gw:
        await wait_connected(gw)
        async with RecordingBackend(
            "127.0.0.1", any_cloud_broker.port, "store-0042", ack=False
        ) as silent:
            await emit(gw, 100)
            await silent.wait_for_seq(100)
        assert gw.outbox.acked_through == 0
        await asyncio.wait_for(_until(lambda: gw.outbox.sent_through == 100), 5)
        any_cloud_broker.restart()  # empty: its queue and sessions are gone
        async with RecordingBackend(
            "127.0.0.1", any_cloud_broker.port, "store-0042", client_id="fresh"
        ) as be:
            await be.wait_for_seq(100, timeout_s=20)  # resent after reconnect / resend_after_s
            check_clean(be.record, 100)
            await asyncio.wait_for(_until(lambda: gw.outbox.acked_through >= 100), 10)


async def test_unacked_events_resent_after_resend_after_s(
    any_cloud_broker: AnyBroker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = cfg_for(config_factory, any_cloud_broker, store_broker, resend_after_s=0.5)
    async with (
        running_gateway(cfg) as gw,
        backend(any_cloud_broker, ack=False) as be,
    ):
        await wait_connected(gw)
        await emit(gw, 10)
        await be.wait_until(lambda r: r.deliveries >= 20, timeout_s=10)  # each event at least twice
        assert be.record.duplicates >= 10 and be.record.changed_ids == []
        await be.ack(10)
        await asyncio.wait_for(_until(lambda: gw.outbox.acked_through == 10), 5)


async def test_ack_is_monotonic_and_bad_acks_are_ignored(
    any_cloud_broker: AnyBroker,
    store_broker: Broker,
    config_factory: ConfigFactory,
    log_output: list[dict[str, Any]],
) -> None:
    cfg = cfg_for(config_factory, any_cloud_broker, store_broker)
    async with (
        running_gateway(cfg) as gw,
        backend(any_cloud_broker, ack=False) as be,
    ):
        await wait_connected(gw)
        await emit(gw, 5)
        await be.wait_for_seq(5)
        client = be._client
        assert client is not None
        for bad in (
            b"not json",
            b"[]",
            b'{"through_seq": "3"}',
            b'{"through_seq": -1}',
            b'{"through_seq": 99}',
        ):
            await client.publish("retail/v1/store-0042/ack", bad, qos=1)
        await be.ack(4)
        await asyncio.wait_for(_until(lambda: gw.outbox.acked_through == 4), 5)
        await be.ack(2)  # lower: ignored
        await asyncio.sleep(0.2)
        assert gw.outbox.acked_through == 4
        await gw.outbox.persist()
        assert await gw.db.meta("acked_through") == 4
        assert sum(1 for e in log_output if e["event"] == "malformed ack ignored") == 4
        assert any(e["event"] == "ack beyond the last event ignored" for e in log_output)


async def test_replay_resends_acked_events(
    any_cloud_broker: AnyBroker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    skip_on_nats(any_cloud_broker)
    cfg = cfg_for(config_factory, any_cloud_broker, store_broker)
    async with (
        running_gateway(cfg) as gw,
        backend(any_cloud_broker) as be,
    ):
        await wait_connected(gw)
        await emit(gw, 20)
        await be.wait_for_seq(20)
        await asyncio.wait_for(_until(lambda: gw.outbox.acked_through == 20), 5)
        before = be.record.deliveries
        cid = await be.send_command("events.replay", {"from_seq": 11})
        result = await be.wait_for_result(cid)
        assert result["status"] == "ok" and result["duplicate"] is False
        await be.wait_until(lambda r: r.deliveries >= before + 10)
        assert be.record.changed_ids == []


async def test_commands_checked_in_spec_order(
    any_cloud_broker: AnyBroker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    skip_on_nats(any_cloud_broker)
    key = Ed25519PrivateKey.generate()
    other = Ed25519PrivateKey.generate()
    cfg = config_factory(
        any_cloud_broker.url,
        store_broker.url,
        cloud={"protocol": any_cloud_broker.protocol},
        security={"command_keys": [public_key_b64(key)]},
    )
    async with (
        running_gateway(cfg) as gw,
        backend(any_cloud_broker) as be,
    ):
        await wait_connected(gw)
        # unreadable envelope: command_id null
        await be.send_raw("events.replay", b"{not json")
        await be.wait_for_result(None)
        assert be.record.results()[None][0]["reason"] == "invalid"
        # unknown name
        cid = await be.send_command("no.such", {})
        assert (await be.wait_for_result(cid))["reason"] == "unknown-command"
        # a present signature must verify, on any command
        be.signing_key = other
        cid = await be.send_command("events.replay", {"from_seq": 1})
        assert (await be.wait_for_result(cid))["reason"] == "bad-signature"
        be.signing_key = key
        # expired (clock synced in tests)
        cid = await be.send_command("events.replay", {"from_seq": 1}, expires_in_s=-5)
        assert (await be.wait_for_result(cid))["reason"] == "expired"
        # invalid data names the field
        cid = await be.send_command("events.replay", {"from_seq": "x"})
        res = await be.wait_for_result(cid)
        assert res["reason"] == "invalid" and "from_seq" in res["detail"]
        # ok, then the same id again → duplicate with the first outcome, no second effect
        cid = await be.send_command("events.replay", {"from_seq": 1}, command_id="c-fixed-1")
        first = await be.wait_for_result(cid)
        assert first["status"] == "ok"
        await be.send_command("events.replay", {"from_seq": 1}, command_id="c-fixed-1")
        await be.wait_until(lambda r: len(r.results().get("c-fixed-1", [])) == 2)
        dup = be.record.results()["c-fixed-1"][1]
        assert dup["duplicate"] is True and dup["status"] == "ok" and dup["data"] == first["data"]
        # forged command does not block the id
        be.signing_key = other
        await be.send_command("events.replay", {"from_seq": 1}, command_id="c-forged")
        await be.wait_until(lambda r: "c-forged" in r.results())
        be.signing_key = key
        await be.send_command("events.replay", {"from_seq": 1}, command_id="c-forged")
        await be.wait_until(lambda r: len(r.results().get("c-forged", [])) == 2)
        assert be.record.results()["c-forged"][1]["status"] == "ok"
        assert be.record.results()["c-forged"][1]["duplicate"] is False
        assert gw.dispatcher.stats.duplicates == 1


async def test_birth_will_goodbye(
    any_cloud_broker: AnyBroker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = cfg_for(config_factory, any_cloud_broker, store_broker)
    async with backend(any_cloud_broker) as be:
        async with running_gateway(cfg) as gw:
            await wait_connected(gw)
            await be.wait_until(lambda r: any(s["state"] == "online" for s in r.states))
            online = next(s for s in be.record.states if s["state"] == "online")
            assert online["boot_id"] == gw.boot_id and "last_seq" in online and "since" in online
        await be.wait_until(lambda r: r.states[-1]["state"] == "offline")
        assert be.record.states[-1]["reason"] == "shutdown"


async def test_health_message(
    any_cloud_broker: AnyBroker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = cfg_for(config_factory, any_cloud_broker, store_broker, health_interval_s=0.2)
    async with (
        running_gateway(cfg) as gw,
        backend(any_cloud_broker) as be,
    ):
        await wait_connected(gw)
        await be.wait_until(lambda r: len(r.health) >= 1)
        h = be.record.health[-1]
        assert set(h) >= {
            "at",
            "boot_id",
            "uptime_s",
            "outbox",
            "cloud",
            "store_bus",
            "devices",
            "disk",
            "clock",
        }
        assert set(h["outbox"]) == {"pending", "unacked", "oldest_pending_age_s", "last_acked_seq"}
        assert h["cloud"]["state"] == "connected" and h["cloud"]["connected_since"]
        json.dumps(h)


async def test_failing_handler_still_yields_exactly_one_result(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    class Empty(BaseModel):
        pass

    async def boom(_cmd: Command, _data: Empty) -> Outcome:
        raise RuntimeError("a bug in a handler")

    cfg = config_factory(cloud_broker.url, store_broker.url)
    async with running_gateway(cfg) as gw, backend(cloud_broker) as be:
        gw.dispatcher.register("boom", CommandSpec(handler=boom, data_model=Empty))
        await wait_connected(gw)
        cid = await be.send_command("boom", {})
        result = await be.wait_for_result(cid)
        assert (result["status"], result["reason"]) == ("failed", "internal-error")
        assert "a bug in a handler" in result["detail"]
        await be.send_command("boom", {}, command_id=cid)  # remembered: same outcome, no rerun
        await be.wait_until(lambda r: len(r.results()[cid]) == 2)
        assert be.record.results()[cid][1]["duplicate"] is True


async def test_max_publish_rate_caps_event_messages(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    cfg = config_factory(
        cloud_broker.url, store_broker.url, cloud={"max_publish_rate": 20, "max_batch": 1}
    )
    async with running_gateway(cfg) as gw, backend(cloud_broker) as be:
        await wait_connected(gw)
        await emit(gw, 30)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await be.wait_for_seq(30, timeout_s=20)
        # 30 one-event messages at 20/s: at least ~0.5 s beyond the first second's burst
        assert loop.time() - start >= 0.4
        assert be.record.messages >= 30


async def test_pathologically_nested_json_gets_a_clear_answer_on_every_edge(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    """json.loads raises RecursionError (not JSONDecodeError) for '[[[[…'; a 128 KiB message can nest 64k deep."""
    deep = b"[" * 60_000
    cfg = config_factory(cloud_broker.url, store_broker.url)
    async with running_gateway(cfg) as gw, backend(cloud_broker) as be:
        await wait_connected(gw)
        await be.send_raw("events.replay", deep)
        result = await be.wait_for_result(None)
        assert result["reason"] == "invalid" and "nested too deeply" in result["detail"]
        assert be._client is not None
        await be._client.publish("retail/v1/store-0042/ack", deep, qos=1)
        async with aiomqtt.Client("127.0.0.1", store_broker.port, identifier="deep-till") as till:
            await till.subscribe("store/v1/errors", qos=1)
            await till.publish("store/v1/pos/pos-1/sale", deep, qos=1)
            async with asyncio.timeout(10):
                message = await anext(aiter(till.messages))
            error = json.loads(bytes(message.payload))  # type: ignore[arg-type]
            assert error["topic"] == "store/v1/pos/pos-1/sale"
            assert error["error"]["code"] == "invalid-json"
        # and the gateway is still serving: a normal command is answered
        cid = await be.send_command("events.replay", {"from_seq": 10**9})
        assert (await be.wait_for_result(cid))["status"] == "ok"
