"""Fuzzing every parser at the gateway's edges: only typed errors, never a crash, bounded time.

- Store API: random JSON objects, mutated valid requests and random bytes into the store bus
  dispatch of every registered route of an in-process gateway (POS, payments, lockers — whatever
  the service registry installs). Each message gets exactly one answer: on its ``…/result`` topic
  (``rejected`` carries ``error: {code, message}``) or, when its id is unreadable, on
  ``store/v1/errors``.
- Cloud commands: random and mutated envelopes into ``CommandDispatcher.handle``: it never raises
  and commits exactly one ``command.result``; a malformed envelope is ``rejected``/``invalid``.
- Config: random bytes and random TOML documents into ``read_toml``/``load_config``, random leaf
  values into a valid configuration, random environment overrides: ``ConfigError`` or a config.
- Devices: what tests/devices/ does not fuzz yet — the Modbus request decoder, ``decode_bits``
  with any count, BCD and PAN helpers of the ZVT codec, and APDU splitting under any chunking.

Deadlines bound the time per input (hypothesis fails an example that takes longer).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import tomllib
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices import modbus_rtu as rtu
from devices import zvt_codec as codec
from devices.errors import DeviceProtocolError
from gateway.app import Gateway
from gateway.config import apply_env_overrides, load_config, parse_config, read_toml
from gateway.errors import ConfigError
from gateway.mqtt import Inbound
from tests.conftest import make_config_dict
from tests.gwharness import running_gateway
from tests.tillclient import return_, sale

FUZZ = settings(
    max_examples=150,
    deadline=1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- JSON strategies ------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)

FIELDS = [
    "sale_id", "return_id", "request_id", "order_id", "code", "compartment", "lines", "sku",
    "qty", "unit_price_minor", "total_minor", "currency", "payments", "method", "amount_minor",
    "payment_ref", "completed_at", "original_sale_id", "skus", "kind", "reversal_of",
]  # fmt: skip


def _valid_bodies() -> dict[str, dict[str, Any]]:
    return {
        "sale": sale("s-1", [("4006381333931", 2, 199)]),
        "return": return_("r-1", [("4006381333931", 1, 199)], original_sale_id="s-1"),
        "stock": {"request_id": "q-1", "skus": ["4006381333931"]},
        "payment/request": {"request_id": "p-1", "kind": "purchase", "amount_minor": 398,
                            "currency": "EUR"},
        "payment/abort": {"request_id": "p-1"},
        "load": {"request_id": "l-1", "order_id": "o-1"},
        "pickup": {"request_id": "k-1", "code": "482913"},
        "retrieve": {"request_id": "t-1", "compartment": 1},
    }  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """A valid body with a few fields replaced, removed or added (nested lists included)."""
    body = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        target = body
        if draw(st.booleans()):
            nested = [
                v for v in body.values() if isinstance(v, list) and v and isinstance(v[0], dict)
            ]
            if nested:
                target = draw(st.sampled_from(nested))[0]
        key = draw(st.sampled_from(sorted(target) + FIELDS))
        match draw(st.sampled_from(["replace", "delete", "add"])):
            case "delete":
                target.pop(key, None)
            case _:
                target[key] = draw(json_values)
    return body


# --- an in-process gateway (brokers unreachable: replies are captured) ---------------------------


@pytest.fixture(scope="module")
def gateway_env(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[asyncio.Runner, Gateway, list[tuple[str, dict[str, Any]]]]]:
    """A built, serving gateway on its own event loop; ``published`` collects store-bus replies."""
    tmp = tmp_path_factory.mktemp("fuzzgw")
    cfg = parse_config(make_config_dict(tmp, "mqtt://127.0.0.1:9", "mqtt://127.0.0.1:9",
                                        logging={"level": "error"}))  # fmt: skip
    published: list[tuple[str, dict[str, Any]]] = []
    with asyncio.Runner() as runner:
        stack = AsyncExitStack()
        gw = runner.run(stack.enter_async_context(running_gateway(cfg)))

        async def capture(topic: str, body: Any, *, retain: bool = False) -> None:
            del retain
            published.append((topic, dict(body)))

        gw.store_bus.publish_json = capture  # type: ignore[method-assign]
        try:
            yield runner, gw, published
        finally:
            runner.run(stack.aclose())


def _dispatch(env: Any, topic: str, payload: bytes) -> list[tuple[str, dict[str, Any]]]:
    runner, gw, published = env
    published.clear()
    runner.run(asyncio.wait_for(gw.store_bus._on_message(Inbound(topic, payload)), 5))
    return list(published)


def _check_one_answer(
    route: Any, topic: str, payload: bytes, out: list[tuple[str, dict[str, Any]]]
) -> None:
    assert len(out) >= 1, f"no answer to {payload[:200]!r} on {topic}"
    finals = [(t, b) for t, b in out if not t.endswith("/status")]
    assert len(finals) == 1, f"{len(finals)} answers to {payload[:200]!r}: {finals}"
    reply_topic, body = finals[0]
    if reply_topic == "store/v1/errors":
        assert body["topic"] == topic and body["error"]["code"] and body["error"]["message"]
        return
    assert reply_topic.endswith("/" + route.result), (reply_topic, route.result)
    assert isinstance(body.get(route.id_field), str)
    if "status" not in body:  # a stock answer has none: it carries the items
        assert route.action == "stock" and isinstance(body.get("items"), list), body
        return
    assert isinstance(body["status"], str)
    if body["status"] == "rejected":
        assert body["error"]["code"] and body["error"]["message"], body


def _routes(env: Any) -> list[Any]:
    return sorted(env[1].store_bus.routes.values(), key=lambda r: (r.area, r.action))


def _topic(route: Any) -> str:
    owner = "pos-1" if route.area == "pos" else "bank-1"
    return f"store/v1/{route.area}/{owner}/{route.action}"


@FUZZ
@given(data=st.data())
def test_store_api_random_json_objects_get_exactly_one_typed_answer(
    gateway_env: Any, data: st.DataObject
) -> None:
    route = data.draw(st.sampled_from(_routes(gateway_env)))
    body = data.draw(
        st.dictionaries(
            st.sampled_from([route.id_field, *FIELDS]) | st.text(max_size=8),
            json_values,
            max_size=8,
        )
    )
    payload = json.dumps(body).encode()
    _check_one_answer(route, _topic(route), payload, _dispatch(gateway_env, _topic(route), payload))


@FUZZ
@given(data=st.data())
def test_store_api_mutated_valid_requests_get_exactly_one_typed_answer(
    gateway_env: Any, data: st.DataObject
) -> None:
    route = data.draw(st.sampled_from(_routes(gateway_env)))
    base = _valid_bodies().get(route.action, {route.id_field: "x-1"})
    body = data.draw(mutated(base))
    body.setdefault(route.id_field, f"fz-{data.draw(st.integers(0, 10**9))}")
    payload = json.dumps(body).encode()
    _check_one_answer(route, _topic(route), payload, _dispatch(gateway_env, _topic(route), payload))


@FUZZ
@given(data=st.data(), payload=st.binary(max_size=400) | st.text(max_size=200).map(str.encode))
def test_store_api_random_bytes_get_exactly_one_typed_answer(
    gateway_env: Any, data: st.DataObject, payload: bytes
) -> None:
    route = data.draw(st.sampled_from(_routes(gateway_env)))
    _check_one_answer(route, _topic(route), payload, _dispatch(gateway_env, _topic(route), payload))


# --- cloud commands ---------------------------------------------------------------------------------


def _results(env: Any) -> int:
    runner, gw, _ = env
    row = runner.run(gw.db.fetchone("SELECT COUNT(*) FROM events WHERE type = 'command.result'"))
    return int(row[0]) if row else 0


def _last_result(env: Any) -> dict[str, Any]:
    runner, gw, _ = env
    row = runner.run(
        gw.db.fetchone(
            "SELECT body FROM events WHERE type = 'command.result' ORDER BY seq DESC LIMIT 1"
        )
    )
    assert row is not None
    return dict(json.loads(row[0])["data"])


DATA_FIELDS = [
    "snapshot_id", "as_of_seq", "part", "parts", "items", "sku", "delta", "reason",
    "adjustment_id", "from_seq", "device_id", "order_id", "bank", "compartment", "size",
    "pickup_by", "customer_ref",
]  # fmt: skip


@st.composite
def envelopes(draw: st.DrawFn, names: list[str]) -> tuple[str, dict[str, Any]]:
    name = draw(st.sampled_from([*names, "no.such.command"]))
    env: dict[str, Any] = {
        "id": f"c-fz-{draw(st.integers(0, 10**12))}", "name": name,
        "issued_at": "2026-11-22T18:00:00.000Z", "expires_at": "2999-01-01T00:00:00.000Z",
        "data": draw(st.dictionaries(st.sampled_from(DATA_FIELDS), json_values, max_size=6)),
    }  # fmt: skip
    for _ in range(draw(st.integers(0, 2))):
        key = draw(
            st.sampled_from(["id", "name", "issued_at", "expires_at", "data", "sig", "extra"])
        )
        if draw(st.booleans()):
            env.pop(key, None)
        else:
            env[key] = draw(json_values)
    return name, env


@FUZZ
@given(data=st.data())
def test_cloud_commands_random_envelopes_yield_one_result_each(
    gateway_env: Any, data: st.DataObject
) -> None:
    runner, gw, _ = gateway_env
    topic_name, env = data.draw(envelopes(sorted(gw.dispatcher.table)))
    raw = data.draw(st.sampled_from(["json", "json", "bytes"]))
    payload = json.dumps(env).encode() if raw == "json" else data.draw(st.binary(max_size=200))
    before = _results(gateway_env)
    runner.run(asyncio.wait_for(gw.dispatcher.handle(topic_name, payload), 5))
    assert _results(gateway_env) == before + 1, "every command yields exactly one command.result"
    result = _last_result(gateway_env)
    assert result["status"] in ("ok", "rejected", "failed")
    assert result["status"] == "ok" or result.get("reason")
    if raw == "bytes":
        assert (result["status"], result["reason"]) == ("rejected", "invalid")


# --- configuration ------------------------------------------------------------------------------------


def _load_or_config_error(path: Path) -> None:
    with contextlib.suppress(ConfigError):
        load_config(path, env={}, check_secrets=False)


@FUZZ
@given(data=st.binary(max_size=600))
def test_config_random_bytes_only_config_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(data)
    with contextlib.suppress(ConfigError):
        read_toml(path)
    _load_or_config_error(path)


toml_keys = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=12)
toml_values = st.recursive(
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(toml_keys, inner, max_size=4),
    max_leaves=15,
)
SECTIONS = [
    "schema_version", "store", "cloud", "store_bus", "storage", "security", "clock", "inventory",
    "pos", "lockers", "control", "discovery", "logging", "payment_terminals", "locker_banks",
]  # fmt: skip
ENV_KEYS = [
    "CLOUD__KEEPALIVE_S", "CLOUD__URL", "STORE__ID", "STORAGE__MAX_BYTES", "CLOCK__SYNCED",
    "POS__CURRENCIES", "NO__SUCH", "CLOUD",
]  # fmt: skip


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(SECTIONS) | toml_keys, toml_values, max_size=8))
def test_config_random_toml_documents_only_config_errors(
    tmp_path: Path, doc: dict[str, Any]
) -> None:
    try:
        text = tomlkit.dumps(doc)
        tomllib.loads(text)
    except Exception:
        return
    path = tmp_path / "fuzz.toml"
    path.write_text(text)
    _load_or_config_error(path)


def _parse_or_named_error(raw: dict[str, Any]) -> None:
    """A valid config, or a ConfigError that says what is wrong."""
    try:
        parse_config(raw)
    except ConfigError as err:
        problem = err.problem
    else:
        return
    assert problem, "a ConfigError must say what is wrong"


def _leaves(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, (*prefix, k))
    else:
        yield prefix


@FUZZ
@given(data=st.data())
def test_config_valid_file_with_random_leaves_validates_or_names_the_key(
    tmp_path: Path, data: st.DataObject
) -> None:
    raw = make_config_dict(tmp_path, "mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1884")
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(list(_leaves(raw))))
        node = raw
        for part in where[:-1]:
            node = node[part]
        node[where[-1]] = data.draw(toml_values)
    _parse_or_named_error(raw)


@FUZZ
@given(
    key=st.sampled_from(
        [
            "CLOUD__KEEPALIVE_S",
            "CLOUD__URL",
            "STORE__ID",
            "STORAGE__MAX_BYTES",
            "CLOCK__SYNCED",
            "POS__CURRENCIES",
            "NO__SUCH",
            "CLOUD",
        ]
    )
    | toml_keys.map(str.upper),
    value=st.text(max_size=40),
)
def test_config_random_environment_overrides_only_config_errors(
    tmp_path: Path, key: str, value: str
) -> None:
    raw = make_config_dict(tmp_path, "mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1884")
    if "\x00" in value:
        return  # the environment cannot hold NUL
    try:
        apply_env_overrides(raw, {f"STORE_GATEWAY__{key}": value})
    except ConfigError as err:
        problem = err.problem
    else:
        _parse_or_named_error(raw)
        return
    assert problem, "a ConfigError must say what is wrong"


# --- devices: what tests/devices/ does not fuzz yet -----------------------------------------------


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8))
def test_modbus_request_decoder_any_bytes_any_chunking(data: bytes, cuts: list[int]) -> None:
    decoder = rtu.FrameDecoder(rtu.request_length)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    for lo, hi in itertools.pairwise(bounds):
        for frame in decoder.feed(data[lo:hi]):
            assert rtu.crc16(frame.encode()) == 0
    assert decoder.pending <= 256


@FUZZ
@given(
    unit=st.integers(0, 255),
    function=st.integers(0, 255),
    payload=st.binary(max_size=40),
    count=st.integers(-5, 4000),
)
def test_modbus_decode_bits_any_frame_any_count(
    unit: int, function: int, payload: bytes, count: int
) -> None:
    frame = rtu.Frame(unit, function, payload)
    with contextlib.suppress(DeviceProtocolError, ValueError):
        bits = rtu.decode_bits(frame, count)
        assert len(bits) == count


@FUZZ
@given(raw=st.binary(max_size=40))
def test_zvt_bcd_and_pan_helpers_any_bytes(raw: bytes) -> None:
    for helper in (codec.bcd_digits, codec.bcd_decode, codec.mask_pan):
        with contextlib.suppress(DeviceProtocolError):
            out = helper(raw)
            assert out is not None
    with contextlib.suppress(DeviceProtocolError):
        masked = codec.mask_pan(raw)
        digits = [c for c in masked if c.isdigit()]
        assert len(digits) <= 10, f"mask_pan shows too many digits: {masked}"


@FUZZ
@given(
    apdus=st.lists(st.binary(min_size=3, max_size=300), max_size=5),
    cuts=st.lists(st.integers(0, 2000), max_size=10),
)
def test_zvt_apdu_splitter_is_independent_of_chunking(apdus: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(codec.Apdu(a[0], a[1], a[3:]).encode() for a in apdus)
    whole = codec.ApduSplitter().feed(stream)
    splitter = codec.ApduSplitter()
    bounds = [0, *sorted(c for c in cuts if c <= len(stream)), len(stream)]
    pieces = [a for lo, hi in itertools.pairwise(bounds) for a in splitter.feed(stream[lo:hi])]
    assert pieces == whole
    assert len(whole) == len(apdus) and splitter.pending == 0
    assert all(math.isfinite(len(a.data)) for a in whole)
