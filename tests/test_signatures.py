"""Signed cloud commands (cloud-api.md, Signature; issue 8): canonical JSON, keys, checks, replay.

Unit tests pin the signed bytes; the rest run in-process gateways against real mosquitto and
drive commands the way the cloud does, over MQTT, reading the ``command.result`` events back.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, StrictInt

from gateway import commands
from gateway.app import Gateway
from gateway.backend_sim import RecordingBackend
from gateway.clock import format_rfc3339
from gateway.commands import Command, CommandSpec, Outcome
from gateway.config import GatewayConfig, SecuritySection
from gateway.db import Work
from gateway.signing import Verifier, canonical_json, public_key_b64, sign
from tests.conftest import Broker
from tests.gwharness import running_gateway, wait_connected

ConfigFactory = Callable[..., GatewayConfig]


# --- canonical JSON and the verifier (no broker) ------------------------------------------------


def test_canonical_json_is_the_specified_byte_string() -> None:
    env = {
        "sig": "dropped",
        "name": "inventory.adjust",
        "id": "c-1",
        "data": {
            "reason": "Lieferung Größe M – ✓",
            "delta": -12,
            "big": 12345678901234567890,
            "nested": {"b": [3, {"z": 1, "a": None}], "B": True, "é": "ü", "a": False},
            # code point order: U+FF01 sorts before U+1F600 (UTF-16 order would swap them)
            "\U0001f600": 1,
            "\uff01": 2,
        },
        "issued_at": "2026-11-22T18:00:00.000Z",
    }
    expected = (
        '{"data":{"big":12345678901234567890,"delta":-12,'
        '"nested":{"B":true,"a":false,"b":[3,{"a":null,"z":1}],"é":"ü"},'
        '"reason":"Lieferung Größe M – ✓","！":2,"😀":1},'
        '"id":"c-1","issued_at":"2026-11-22T18:00:00.000Z","name":"inventory.adjust"}'
    ).encode()
    assert canonical_json(env) == expected
    assert b"\\u" not in canonical_json(env)  # raw UTF-8, no escapes
    # and it is exactly the spec's recipe, so any cloud written in Python signs the same bytes
    body = {k: v for k, v in env.items() if k != "sig"}
    assert (
        expected
        == json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )


def test_signature_is_ed25519_over_the_canonical_bytes() -> None:
    key = Ed25519PrivateKey.generate()
    env: dict[str, Any] = {
        "id": "c-2",
        "name": "x",
        "issued_at": "2026-11-22T18:00:00Z",
        "data": {"ü": 1},
    }
    sig = sign(env, key)
    env["sig"] = sig
    raw = base64.b64decode(sig, validate=True)
    assert len(raw) == 64
    key.public_key().verify(raw, canonical_json(env))  # raises when wrong
    assert Verifier([public_key_b64(key)]).verify(env)


def _signed(key: Ed25519PrivateKey, **data: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "id": "c-3",
        "name": "x",
        "issued_at": "2026-11-22T18:00:00Z",
        "data": dict(data),
    }
    env["sig"] = sign(env, key)
    return env


@pytest.mark.parametrize(
    ("mangle", "why"),
    [
        (lambda e: e | {"sig": "not base64!"}, "not base64"),
        (lambda e: e | {"sig": e["sig"].rstrip("=")}, "padding missing"),
        (lambda e: e | {"sig": base64.b64encode(b"\0" * 32).decode()}, "32 bytes"),
        (lambda e: e | {"sig": base64.b64encode(b"\0" * 64).decode()}, "zeros"),
        (lambda e: e | {"sig": ""}, "empty"),
        (lambda e: e | {"data": {"n": 2}}, "data tampered"),
        (lambda e: e | {"expires_at": "2099-01-01T00:00:00Z"}, "field added"),
        (lambda e: {k: v for k, v in e.items() if k != "sig"}, "no sig"),
    ],
)
def test_verifier_refuses(mangle: Callable[[dict[str, Any]], dict[str, Any]], why: str) -> None:
    key = Ed25519PrivateKey.generate()
    env = _signed(key, n=1)
    verifier = Verifier([public_key_b64(key)])
    assert verifier.verify(env), "the untouched envelope verifies"
    assert not verifier.verify(mangle(env)), why


def test_verifier_accepts_any_configured_key_only() -> None:
    old, new, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    both = Verifier([public_key_b64(old), public_key_b64(new)])
    assert both.verify(_signed(old)) and both.verify(_signed(new))
    assert not both.verify(_signed(stranger))
    assert not Verifier([public_key_b64(new)]).verify(_signed(old))
    assert not Verifier([]).verify(_signed(old))


def test_security_defaults() -> None:
    section = SecuritySection()
    assert section.signed_commands == ["locker.open"]
    assert section.require_signatures is False
    assert section.command_keys == []


# --- through the gateway ------------------------------------------------------------------------


class Nothing(BaseModel):
    """No data."""


class Pulse(BaseModel):
    """Data of the test's physical command."""

    channel: StrictInt


@dataclass(slots=True)
class Effects:
    """Test commands registered on a gateway, counting how often their effect ran."""

    calls: list[str] = field(default_factory=list)

    def install(self, gw: Gateway) -> None:
        """``test.effect`` (plain) and ``test.pulse`` (physical, like locker.open)."""

        async def effect(cmd: Command, _data: Nothing) -> Outcome:
            self.calls.append(cmd.id)
            return Outcome(data={"n": len(self.calls)})

        async def pulse(cmd: Command, data: Pulse) -> Outcome:
            self.calls.append(cmd.id)
            return Outcome(data={"channel": data.channel})

        gw.dispatcher.register("test.effect", CommandSpec(effect, Nothing))
        gw.dispatcher.register("test.pulse", CommandSpec(pulse, Pulse, physical=True))


def envelope(
    name: str,
    data: dict[str, Any],
    *,
    key: Ed25519PrivateKey | None,
    cid: str,
    expires_in_s: float | None = 600.0,
) -> dict[str, Any]:
    """A command envelope as the cloud sends it, signed by ``key`` when given."""
    now = time.time()
    env: dict[str, Any] = {
        "id": cid,
        "name": name,
        "issued_at": format_rfc3339(now),
        "data": data,
    }
    if expires_in_s is not None:
        env["expires_at"] = format_rfc3339(now + expires_in_s)
    if key is not None:
        env["sig"] = sign(env, key)
    return env


async def send(be: RecordingBackend, env: dict[str, Any], nth: int = 1) -> dict[str, Any]:
    """Publish an envelope on its command topic; the ``nth`` result for its id."""
    await be.send_raw(env["name"], json.dumps(env, ensure_ascii=False).encode())
    cid = env["id"]
    await be.wait_until(lambda r: len(r.results().get(cid, [])) >= nth)
    return be.record.results()[cid][nth - 1]


async def remembered(gw: Gateway, cid: str) -> tuple[float, str] | None:
    """The replay-cache row of an id: (keep_until, result JSON)."""
    row = await gw.db.fetchone("SELECT keep_until, result FROM commands WHERE id = ?", (cid,))
    return None if row is None else (float(row[0]), str(row[1]))


def config(
    factory: ConfigFactory,
    cloud: Broker,
    store: Broker,
    *keys: Ed25519PrivateKey,
    **security: Any,
) -> GatewayConfig:
    """A gateway config trusting ``keys``; test.pulse is a signed command unless overridden."""
    clock = security.pop("clock", "yes")
    security.setdefault("signed_commands", ["locker.open", "test.pulse"])
    return factory(
        cloud.url,
        store.url,
        security={"command_keys": [public_key_b64(k) for k in keys], **security},
        clock={"synced": clock},
    )


@pytest.mark.broker
async def test_key_rotation_and_replay_cache_survive_a_restart(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    effects = Effects()
    # step 1 of a rotation: both keys configured; the cloud still signs with the old one, then
    # switches to the new one
    cfg = config(config_factory, cloud_broker, store_broker, old, new)
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
    ):
        effects.install(gw)
        await wait_connected(gw)
        by_old = await send(be, envelope("test.pulse", {"channel": 1}, key=old, cid="c-old"))
        by_new = await send(be, envelope("test.pulse", {"channel": 2}, key=new, cid="c-new"))
        assert (by_old["status"], by_new["status"]) == ("ok", "ok")
        assert effects.calls == ["c-old", "c-new"]
    # step 3: the old key is removed from the configuration; the gateway restarts
    cfg = config(config_factory, cloud_broker, store_broker, new)
    effects_after = Effects()
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
    ):
        effects_after.install(gw)
        await wait_connected(gw)
        late_old = await send(be, envelope("test.pulse", {"channel": 3}, key=old, cid="c-old-2"))
        assert (late_old["status"], late_old["reason"]) == ("rejected", "bad-signature")
        # the replay cache is on disk: the id committed before the restart replays its outcome
        again = await send(be, envelope("test.pulse", {"channel": 9}, key=new, cid="c-new"))
        assert again["duplicate"] is True
        assert (again["status"], again["data"]) == ("ok", {"channel": 2})
        # a remembered id signed by the removed key is refused: the signature check comes first
        stale = await send(be, envelope("test.pulse", {"channel": 1}, key=old, cid="c-old"))
        assert (stale["reason"], stale["duplicate"]) == ("bad-signature", False)
        assert effects_after.calls == []  # no second effect, no effect of a refused command


@pytest.mark.broker
async def test_which_commands_need_a_signature(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    key = Ed25519PrivateKey.generate()
    stranger = Ed25519PrivateKey.generate()
    cfg = config(config_factory, cloud_broker, store_broker, key)
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
    ):
        Effects().install(gw)
        await wait_connected(gw)
        # a listed (physical) command without a signature: refused
        res = await send(be, envelope("test.pulse", {"channel": 1}, key=None, cid="u-1"))
        assert res["reason"] == "bad-signature"
        if "locker.open" in gw.dispatcher.table:  # the lockers service is installed
            res = await send(
                be,
                envelope(
                    "locker.open",
                    {"bank": "A", "compartment": 1, "reason": "x"},
                    key=None,
                    cid="u-lock",
                ),
            )
            assert res["reason"] == "bad-signature"
        # an unlisted command without a signature passes (require_signatures = false) …
        res = await send(be, envelope("test.effect", {}, key=None, cid="u-2"))
        assert res["status"] == "ok"
        # … but a signature that is present must verify, on any command
        res = await send(be, envelope("test.effect", {}, key=stranger, cid="u-3"))
        assert res["reason"] == "bad-signature"
    cfg = config(config_factory, cloud_broker, store_broker, key, require_signatures=True)
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
    ):
        Effects().install(gw)
        await wait_connected(gw)
        for name, data in (("test.effect", {}), ("events.replay", {"from_seq": 1})):
            res = await send(be, envelope(name, data, key=None, cid=f"r-{name}"))
            assert res["reason"] == "bad-signature", name
            res = await send(be, envelope(name, data, key=key, cid=f"s-{name}"))
            assert res["status"] == "ok", name


def _variants(key: Ed25519PrivateKey) -> dict[str, dict[str, Any]]:
    """Forged or broken signatures on test.effect, by what is wrong."""
    good = envelope("test.effect", {}, key=key, cid="f-template")

    def forged(cid: str, **changes: Any) -> dict[str, Any]:
        return good | {"id": cid} | changes

    return {
        "not-base64": forged("f-1", sig="***not base64***"),
        "wrong-length": forged("f-2", sig=base64.b64encode(b"x" * 63).decode()),
        "tampered-id": forged("f-3"),  # signed for f-template, sent as f-3
        "tampered-data": forged("f-4", data={"extra": 1}),
        "other-key": envelope("test.effect", {}, key=Ed25519PrivateKey.generate(), cid="f-5"),
    }


@pytest.mark.broker
async def test_forged_signatures_are_refused_and_not_remembered(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    key = Ed25519PrivateKey.generate()
    effects = Effects()
    cfg = config(config_factory, cloud_broker, store_broker, key)
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
    ):
        effects.install(gw)
        await wait_connected(gw)
        for why, env in _variants(key).items():
            res = await send(be, env)
            assert (res["status"], res["reason"], res["duplicate"]) == (
                "rejected",
                "bad-signature",
                False,
            ), why
            assert await remembered(gw, env["id"]) is None, why
        assert effects.calls == []
        # a forged command cannot block its id: the genuine one with that id still runs once
        res = await send(be, envelope("test.effect", {}, key=key, cid="f-3"), nth=2)
        assert (res["status"], res["duplicate"]) == ("ok", False)
        assert effects.calls == ["f-3"]
        assert await remembered(gw, "f-3") is not None


@pytest.mark.broker
async def test_first_failing_check_decides(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    key, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    effects = Effects()
    cfg = config(config_factory, cloud_broker, store_broker, key)
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
    ):
        effects.install(gw)
        await wait_connected(gw)

        async def reason(env: dict[str, Any], nth: int = 1) -> str | None:
            res = await send(be, env, nth)
            return None if res["status"] == "ok" else str(res["reason"])

        bad_shape = envelope("test.pulse", {"channel": 1}, key=stranger, cid="o-1")
        bad_shape["issued_at"] = "yesterday"
        assert await reason(bad_shape) == "invalid"  # shape before name and signature
        assert await reason(envelope("no.such", {}, key=stranger, cid="o-2")) == "unknown-command"
        expired_forged = envelope("test.pulse", {"channel": 1}, key=stranger, cid="o-3")
        expired_forged["expires_at"] = format_rfc3339(time.time() - 60)
        assert await reason(expired_forged) == "bad-signature"  # signature before expiry
        assert (
            await reason(
                envelope("test.pulse", {"channel": "x"}, key=key, cid="o-4", expires_in_s=-60)
            )
            == "expired"
        )  # expiry before data
        assert await reason(envelope("test.pulse", {"channel": "x"}, key=key, cid="o-5")) == (
            "invalid"
        )
        assert await reason(envelope("test.pulse", {"channel": 4}, key=key, cid="o-6")) is None
        # the same id again, now expired and with other data: duplicate (before expiry), first
        # outcome, no second effect
        res = await send(
            be, envelope("test.pulse", {"channel": 5}, key=key, cid="o-6", expires_in_s=-60), 2
        )
        assert (res["duplicate"], res["status"], res["data"]) == (True, "ok", {"channel": 4})
        # a rejected outcome is remembered as well (it passed the signature check)
        res = await send(be, envelope("test.pulse", {"channel": 1}, key=key, cid="o-4"), nth=2)
        assert (res["duplicate"], res["reason"]) == (True, "expired")
        assert effects.calls == ["o-6"]


@pytest.mark.broker
async def test_unsynced_clock_refuses_physical_commands_only(
    cloud_broker: Broker, store_broker: Broker, config_factory: ConfigFactory
) -> None:
    key = Ed25519PrivateKey.generate()
    effects = Effects()
    cfg = config(config_factory, cloud_broker, store_broker, key, clock="no")
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
    ):
        effects.install(gw)
        await wait_connected(gw)
        assert not gw.clock.synced()
        fresh = await send(be, envelope("test.pulse", {"channel": 1}, key=key, cid="k-1"))
        assert fresh["reason"] == "clock-unsynced"
        # expiry cannot be judged: an expired physical command is refused for the clock …
        stale = await send(
            be, envelope("test.pulse", {"channel": 1}, key=key, cid="k-2", expires_in_s=-60)
        )
        assert stale["reason"] == "clock-unsynced"
        # … the clock check comes before the data check …
        junk = await send(be, envelope("test.pulse", {"channel": "x"}, key=key, cid="k-3"))
        assert junk["reason"] == "clock-unsynced"
        # … and a non-physical command passes even when its expires_at looks past
        plain = await send(be, envelope("test.effect", {}, key=key, cid="k-4", expires_in_s=-60))
        assert plain["status"] == "ok"
        assert effects.calls == ["k-4"]


@pytest.mark.broker
async def test_replay_cache_horizon_and_pruning(
    cloud_broker: Broker,
    store_broker: Broker,
    config_factory: ConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = Ed25519PrivateKey.generate()
    effects = Effects()
    skew_s, window_s = 120, 3600
    cfg = config(
        config_factory,
        cloud_broker,
        store_broker,
        key,
        clock_skew_s=skew_s,
        replay_window_s=window_s,
    )
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
    ):
        effects.install(gw)
        await wait_connected(gw)
        env = envelope("test.effect", {}, key=key, cid="p-keep", expires_in_s=7200)
        await send(be, env)
        row = await remembered(gw, "p-keep")
        assert row is not None
        expires = time.time() + 7200
        # kept at least until expiry plus skew (and the replay window beyond)
        assert row[0] == pytest.approx(expires + skew_s + window_s, abs=5)
        no_expiry = envelope("test.effect", {}, key=key, cid="p-open", expires_in_s=None)
        await send(be, no_expiry)
        row = await remembered(gw, "p-open")
        assert row is not None and row[0] >= time.time() + skew_s + window_s - 5

        # Time passes for one of them: its keep_until is now in the past.
        past = time.time() - 1
        await gw.db.submit(
            Work(statements=[("UPDATE commands SET keep_until = ? WHERE id = 'p-keep'", (past,))])
        )
        # an explicit prune just before keep_until keeps it; one after drops it
        assert await gw.dispatcher.prune(now=past - 1) == 0
        assert await remembered(gw, "p-keep") is not None
        # the built-in prune runs with command handling (interval patched down for the test)
        monkeypatch.setattr(commands, "PRUNE_INTERVAL_S", 0.0)
        await send(be, envelope("test.effect", {}, key=key, cid="p-trigger"))
        assert await remembered(gw, "p-keep") is None
        assert await remembered(gw, "p-open") is not None
        assert await remembered(gw, "p-trigger") is not None
        # the pruned id is new again (its expiry has long passed in the real world, where the
        # expiry check refuses it); the kept one is still a duplicate
        res = await send(be, env, nth=2)
        assert res["duplicate"] is False
        res = await send(be, no_expiry, nth=2)
        assert res["duplicate"] is True
        assert effects.calls == ["p-keep", "p-open", "p-trigger", "p-keep"]


@pytest.mark.broker
async def test_no_pruning_while_the_clock_is_unsynced(
    cloud_broker: Broker,
    store_broker: Broker,
    config_factory: ConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = Ed25519PrivateKey.generate()
    cfg = config(config_factory, cloud_broker, store_broker, key, clock="no")
    monkeypatch.setattr(commands, "PRUNE_INTERVAL_S", 0.0)
    async with (
        running_gateway(cfg) as gw,
        RecordingBackend("127.0.0.1", cloud_broker.port, "store-0042") as be,
    ):
        Effects().install(gw)
        await wait_connected(gw)
        await send(be, envelope("test.effect", {}, key=key, cid="n-1"))
        await gw.db.submit(
            Work(statements=[("UPDATE commands SET keep_until = 0 WHERE id = 'n-1'", ())])
        )
        await send(be, envelope("test.effect", {}, key=key, cid="n-2"))
        # a clock that may run ahead must not make the gateway forget ids early
        assert await remembered(gw, "n-1") is not None
