"""The shipped store-broker config and ACL, enforced by a real mosquitto (MQTT 3.1.1 and 5).

Negative checks need no idle wait: the forbidden message is published (and acknowledged) before
an allowed "marker" from the same client to the same subscriber, and a broker delivers one
publisher's QoS 1 messages to a subscriber in order. So once the marker arrives, anything that
was going to leak has arrived before it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import queue
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config" / "mosquitto"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
MOSQUITTO = shutil.which("mosquitto", path=SBIN_PATH)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd", path=SBIN_PATH)
WAIT_S = 5.0
LIMIT_BYTES = 128 * 1024
NOT_AUTHORIZED = 135
Connect = Callable[[str], "Session"]
USERS = ("store-gateway", "pos-1", "pos-2", "kiosk-A", "staff-1")

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(
        MOSQUITTO is None or MOSQUITTO_PASSWD is None,
        reason="mosquitto and mosquitto_passwd are needed (apt-get install mosquitto)",
    ),
]


@dataclass(frozen=True, slots=True)
class Broker:
    """A running mosquitto on 127.0.0.1 with the shipped ACL and one password per user."""

    port: int
    log: Path

    @staticmethod
    def password(user: str) -> str:
        """The test password of ``user``."""
        return f"pw-{user}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _substitute(text: str, old: str, new: str) -> str:
    """Replace one line of the shipped config; fail when the line is gone (config drifted)."""
    lines = text.splitlines()
    assert old in lines, f"shipped store-broker.conf no longer has the line {old!r}"
    return "\n".join(new if line == old else line for line in lines) + "\n"


def _write_config(root: Path, port: int) -> Path:
    """Lay out a Debian-like /etc/mosquitto in ``root`` around the shipped drop-in."""
    passwd = root / "store-broker.passwd"
    for user in USERS:
        create = [] if passwd.exists() else ["-c"]
        assert MOSQUITTO_PASSWD is not None
        subprocess.run(
            [MOSQUITTO_PASSWD, *create, "-b", str(passwd), user, Broker.password(user)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    acl = root / "store-broker.acl"
    shutil.copyfile(CONFIG_DIR / "acl", acl)
    drop_in = (CONFIG_DIR / "store-broker.conf").read_text()
    drop_in = _substitute(drop_in, "listener 1883", f"listener {port} 127.0.0.1")
    drop_in = _substitute(
        drop_in, "password_file /etc/mosquitto/store-broker.passwd", f"password_file {passwd}"
    )
    drop_in = _substitute(drop_in, "acl_file /etc/mosquitto/store-broker.acl", f"acl_file {acl}")
    (root / "conf.d").mkdir()
    (root / "conf.d" / "store-broker.conf").write_text(drop_in)
    (root / "data").mkdir()
    main = [
        # What Debian's /etc/mosquitto/mosquitto.conf provides around the drop-in.
        "persistence true",
        f"persistence_location {root / 'data'}/",
        "log_dest stderr",
        "log_type all",
        # mosquitto started as root drops to the "mosquitto" user, which cannot read tmp_path.
        f"user {pwd.getpwuid(os.getuid()).pw_name}",
        f"include_dir {root / 'conf.d'}",
    ]
    (root / "mosquitto.conf").write_text("\n".join(main) + "\n")
    return root / "mosquitto.conf"


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mosquitto exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)  # bounded start-up wait: mosquitto has no readiness signal here
    pytest.fail(f"mosquitto did not listen on {port} within {WAIT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One mosquitto for the module, killed at teardown."""
    root = tmp_path_factory.mktemp("mosquitto")
    port = _free_port()
    config = _write_config(root, port)
    log = root / "mosquitto.log"
    assert MOSQUITTO is not None
    with log.open("wb") as log_file:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=log_file, stderr=log_file)
    try:
        _wait_for_port(port, proc, log)
        yield Broker(port=port, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(
    params=[MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5], ids=["3.1.1", "5"]
)
def protocol(request: pytest.FixtureRequest) -> MQTTProtocolVersion:
    """Each test runs once per MQTT protocol version."""
    version: MQTTProtocolVersion = request.param
    return version


class Session:
    """A paho client on its own network thread, with acks and messages turned into waits."""

    def __init__(self, user: str | None, password: str | None, protocol: MQTTProtocolVersion):
        self.user = user
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{user or 'anonymous'}-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self._pubacks: dict[int, ReasonCode] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        with self._cond:
            self._connack = reason_code
            self._cond.notify_all()
        if reason_code.is_failure:
            self.client.disconnect()  # no automatic retry with a refused identity

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: object,
        mid: int,
        reason_code: ReasonCode,
        _properties: Properties,
    ) -> None:
        with self._cond:
            self._pubacks[mid] = reason_code
            self._cond.notify_all()

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        _properties: Properties,
    ) -> None:
        with self._cond:
            self._subacks[mid] = reason_codes
            self._cond.notify_all()

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.messages.put((msg.topic, bytes(msg.payload)))

    def connect(self, port: int) -> ReasonCode:
        """Connect and return the CONNACK reason code."""
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self._connack is not None, WAIT_S), "no CONNACK"
            assert self._connack is not None
            return self._connack

    def subscribe(self, topic: str) -> ReasonCode:
        """Subscribe at QoS 1 and return the SUBACK reason code for ``topic``."""
        result, mid = self.client.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert mid is not None
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._subacks, WAIT_S), f"no SUBACK {topic}"
            return self._subacks[mid][0]

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK reason code (always success on 3.1.1)."""
        info = self.client.publish(topic, payload, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self._pubacks, WAIT_S), "no PUBACK"
            return self._pubacks[info.mid]

    def publish_qos0(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 0 and wait until it is written to the socket (there is no ack)."""
        info = self.client.publish(topic, payload, qos=0)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        info.wait_for_publish(WAIT_S)
        assert info.is_published()

    def receive_until(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Messages received before ``payload`` on ``topic``; fails if it does not arrive."""
        before: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + WAIT_S
        while True:
            remaining = deadline - time.monotonic()
            try:
                message = self.messages.get(timeout=max(remaining, 0.001))
            except queue.Empty:
                pytest.fail(f"{self.user} never received {topic}; got before it: {before}")
            if message == (topic, payload):
                return before
            before.append(message)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def connect(broker: Broker, protocol: MQTTProtocolVersion) -> Iterator[Connect]:
    """``connect(user)`` → a connected Session; all are closed at teardown."""
    sessions: list[Session] = []

    def _connect(user: str) -> Session:
        session = Session(user, Broker.password(user), protocol)
        sessions.append(session)
        reason = session.connect(broker.port)
        assert not reason.is_failure, f"{user} refused: {reason}"
        return session

    yield _connect
    for session in sessions:
        session.close()


def _payload(label: str) -> bytes:
    return f'{{"request_id": "{label}-{uuid.uuid4().hex}"}}'.encode()


def _assert_refused(session: Session, reason: ReasonCode, protocol: MQTTProtocolVersion) -> None:
    """On MQTT 5 a refused publish says so in its PUBACK; 3.1.1 has no way to tell."""
    if protocol == MQTTProtocolVersion.MQTTv5:
        assert reason.value == NOT_AUTHORIZED, f"{session.user}: {reason}"


# --- Authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize(("user", "password"), [(None, None), ("pos-1", "wrong")])
def test_anonymous_and_bad_password_refused(
    broker: Broker, protocol: MQTTProtocolVersion, user: str | None, password: str | None
) -> None:
    refused = Session(user, password, protocol)
    allowed = Session("pos-1", Broker.password("pos-1"), protocol)
    try:
        assert refused.connect(broker.port).is_failure
        assert not allowed.connect(broker.port).is_failure  # positive control
    finally:
        refused.close()
        allowed.close()


# --- Tills ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_topic", ["sale", "return", "stock", "payment/request", "payment/abort"]
)
def test_till_publishes_its_own_requests(
    connect: Connect, protocol: MQTTProtocolVersion, request_topic: str
) -> None:
    gateway = connect("store-gateway")
    assert not gateway.subscribe("store/v1/#").is_failure
    till = connect("pos-1")
    topic = f"store/v1/pos/pos-1/{request_topic}"
    payload = _payload(request_topic)
    assert not till.publish(topic, payload).is_failure
    assert gateway.receive_until(topic, payload) == []


def test_till_cannot_publish_for_others(connect: Connect, protocol: MQTTProtocolVersion) -> None:
    gateway = connect("store-gateway")
    assert not gateway.subscribe("store/v1/#").is_failure
    till = connect("pos-1")
    for topic in (
        "store/v1/pos/pos-2/sale",
        "store/v1/pos/pos-2/payment/request",
        "store/v1/pos/pos-1/sale/result",
        "store/v1/lockers/A/pickup",
        "store/v1/gateway/state",
    ):
        _assert_refused(till, till.publish(topic, _payload("forbidden")), protocol)
    marker = _payload("marker")
    till.publish("store/v1/pos/pos-1/sale", marker)
    assert gateway.receive_until("store/v1/pos/pos-1/sale", marker) == []


def test_till_reads_only_its_own_replies(connect: Connect, protocol: MQTTProtocolVersion) -> None:
    gateway = connect("store-gateway")
    pos1 = connect("pos-1")
    pos2 = connect("pos-2")
    own = [
        "store/v1/pos/pos-1/sale/result",
        "store/v1/pos/pos-1/payment/status",
        "store/v1/gateway/state",
        "store/v1/errors",
    ]
    for topic in own:
        assert not pos1.subscribe(topic).is_failure, topic
    # mosquitto 2.0 grants any subscription and checks read access for each delivered message,
    # so what matters is that nothing of pos-2 arrives.
    pos1.subscribe("store/v1/pos/pos-2/sale/result")
    pos1.subscribe("store/v1/pos/pos-2/#")
    assert not pos2.subscribe("store/v1/pos/pos-2/sale/result").is_failure

    other = _payload("pos-2-result")
    gateway.publish("store/v1/pos/pos-2/sale/result", other)
    for topic in own:
        payload = _payload("own")
        gateway.publish(topic, payload)
        assert pos1.receive_until(topic, payload) == [], "pos-1 read pos-2's result"
    assert pos2.receive_until("store/v1/pos/pos-2/sale/result", other) == []


# --- Kiosks and staff -------------------------------------------------------------------------


def test_kiosk_publishes_only_its_banks_pickup(
    connect: Connect, protocol: MQTTProtocolVersion
) -> None:
    gateway = connect("store-gateway")
    assert not gateway.subscribe("store/v1/#").is_failure
    kiosk = connect("kiosk-A")
    for topic in (
        "store/v1/lockers/B/pickup",
        "store/v1/lockers/A/load",
        "store/v1/lockers/A/retrieve",
        "store/v1/lockers/A/state",
        "store/v1/pos/kiosk-A/sale",  # the till patterns must not make a kiosk a till
        "store/v1/pos/pos-1/sale",
    ):
        _assert_refused(kiosk, kiosk.publish(topic, _payload("forbidden")), protocol)
    marker = _payload("pickup")
    assert not kiosk.publish("store/v1/lockers/A/pickup", marker).is_failure
    assert gateway.receive_until("store/v1/lockers/A/pickup", marker) == []


def test_kiosk_reads_only_its_bank(connect: Connect, protocol: MQTTProtocolVersion) -> None:
    gateway = connect("store-gateway")
    kiosk = connect("kiosk-A")
    kiosk.subscribe("store/v1/lockers/B/pickup/result")  # granted, but filtered on delivery
    kiosk.subscribe("store/v1/pos/kiosk-A/sale/result")
    own = ["store/v1/lockers/A/pickup/result", "store/v1/lockers/A/state"]
    for topic in own:
        assert not kiosk.subscribe(topic).is_failure, topic
    gateway.publish("store/v1/lockers/B/pickup/result", _payload("bank-B"))
    gateway.publish("store/v1/pos/kiosk-A/sale/result", _payload("till-pattern"))
    for topic in own:
        payload = _payload("bank-A")
        gateway.publish(topic, payload)
        assert kiosk.receive_until(topic, payload) == []


def test_staff_loads_and_retrieves_at_any_bank(
    connect: Connect, protocol: MQTTProtocolVersion
) -> None:
    gateway = connect("store-gateway")
    assert not gateway.subscribe("store/v1/#").is_failure
    staff = connect("staff-1")
    assert not staff.subscribe("store/v1/lockers/+/load/result").is_failure
    for topic in ("store/v1/lockers/A/load", "store/v1/lockers/B/retrieve"):
        payload = _payload("staff")
        assert not staff.publish(topic, payload).is_failure
        assert gateway.receive_until(topic, payload) == []
    for topic in ("store/v1/lockers/A/pickup", "store/v1/pos/staff-1/sale"):
        _assert_refused(staff, staff.publish(topic, _payload("forbidden")), protocol)
    marker = _payload("marker")
    staff.publish("store/v1/lockers/C/load", marker)
    assert gateway.receive_until("store/v1/lockers/C/load", marker) == []
    result = _payload("load-result")
    gateway.publish("store/v1/lockers/B/load/result", result)
    assert staff.receive_until("store/v1/lockers/B/load/result", result) == []


# --- Limits -----------------------------------------------------------------------------------


def test_message_above_128_kib_is_not_delivered(
    connect: Connect, protocol: MQTTProtocolVersion
) -> None:
    gateway = connect("store-gateway")
    assert not gateway.subscribe("store/v1/#").is_failure
    till = connect("pos-1")
    topic = "store/v1/pos/pos-1/sale"
    too_big = b"x" * (LIMIT_BYTES + 1)
    till.publish_qos0(topic, too_big)
    if protocol == MQTTProtocolVersion.MQTTv311:
        # Acknowledged but dropped. Not tried on MQTT 5: mosquitto 2.0.11 answers with PUBACK
        # reason 0x95, which MQTT 5 does not allow in a PUBACK, and paho drops the connection.
        assert not till.publish(topic, too_big).is_failure
    at_limit = _payload("limit").ljust(LIMIT_BYTES, b" ")
    assert len(at_limit) == LIMIT_BYTES
    assert not till.publish(topic, at_limit).is_failure
    assert gateway.receive_until(topic, at_limit) == []
