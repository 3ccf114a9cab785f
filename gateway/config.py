"""Configuration: one typed model for the whole TOML file, validated once at the edge.

Loading order: read the file (UTF-8 TOML) → migrate ``schema_version`` → apply
``STORE_GATEWAY__SECTION__KEY`` environment overrides → validate with pydantic → check secret
files. Every failure becomes a :class:`~gateway.errors.ConfigError` naming file, key and problem;
unknown keys only warn (typos must not be silent, but must not stop a store either).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from devices.locker import LockerBankSettings
from devices.zvt import ZvtSettings
from gateway.errors import ConfigError

SCHEMA_VERSION = 1
DEFAULT_CONFIG_PATH = "/etc/store-gateway/gateway.toml"
ENV_PREFIX = "STORE_GATEWAY__"
STORE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"
REDACTED = "***"
_SECRET_KEYS = frozenset({"password", "secret", "token", "passphrase"})


def default_config_path() -> str:
    """``$STORE_GATEWAY_CONFIG`` or the packaged default path."""
    return os.environ.get("STORE_GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


def _check_mqtt_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError("must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError("must name a host, e.g. mqtt://127.0.0.1:1883")
    try:
        _ = parts.port
    except ValueError as err:
        raise ValueError("has an invalid port") from err
    return url


class StoreSection(_Section):
    """Which store this gateway serves."""

    id: Annotated[
        str,
        Field(
            pattern=STORE_ID_PATTERN,
            description="Store id used in every topic (`[a-z0-9][a-z0-9-]{0,63}`).",
        ),
    ]
    name: str = Field(
        "", max_length=200, description="Human-readable store name (shown in status output)."
    )


class MqttSection(_Section):
    """Settings shared by both MQTT links."""

    url: str = Field(description="Broker URL: mqtt://host:port or mqtts://host:port (TLS).")
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description='MQTT protocol version: "5" or "3.1.1".'
    )
    client_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="MQTT client id (default derived from the store id).",
    )
    username: str | None = Field(
        None, description="Username for the broker (password from password_file)."
    )
    password_file: Path | None = Field(
        None,
        description="File holding the broker password; must not be readable by group or others.",
    )
    ca_file: Path | None = Field(
        None, description="CA bundle for mqtts:// (default: the system trust store)."
    )
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS.")
    key_file: Path | None = Field(
        None,
        description="Client private key for mutual TLS; must not be readable by group or others.",
    )
    keepalive_s: int = Field(
        30,
        ge=5,
        le=3600,
        description="MQTT keepalive; a dead (half-open) link is detected within about 1.5x this.",
    )
    connect_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Give up one connection attempt after this long."
    )
    backoff_initial_s: float = Field(
        0.5,
        gt=0,
        le=60,
        description="First reconnect delay (capped, jittered exponential backoff).",
    )
    backoff_max_s: float = Field(60.0, gt=0, le=3600, description="Longest reconnect delay.")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        return _check_mqtt_url(url)

    @model_validator(mode="after")
    def _tls_pairs(self) -> MqttSection:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be given together")
        if (self.cert_file or self.ca_file) and not self.url.startswith("mqtts://"):
            raise ValueError("ca_file/cert_file/key_file need an mqtts:// url")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs a username")
        return self

    @property
    def tls(self) -> bool:
        """True for mqtts:// URLs."""
        return self.url.startswith("mqtts://")

    @property
    def host(self) -> str:
        """Broker host name."""
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """Broker port (default 1883, or 8883 for TLS)."""
        return urlsplit(self.url).port or (8883 if self.tls else 1883)


class CloudSection(MqttSection):
    """The link to the cloud backend (cloud-api.md)."""

    resend_after_s: float = Field(
        60.0,
        gt=0,
        description="Send sent-but-unacknowledged events again after this long without an ack.",
    )
    max_inflight: int = Field(
        100,
        ge=1,
        le=65535,
        description="QoS 1 event messages in flight at once (AWS IoT allows 100).",
    )
    max_batch: int = Field(
        100,
        ge=1,
        le=1000,
        description="Events per MQTT message at most (a message also stays under 128 KiB).",
    )
    max_publish_rate: float | None = Field(
        None,
        gt=0,
        description="Event messages per second at most (for brokers with quotas); unset = no limit.",
    )
    health_interval_s: float = Field(
        60.0, gt=0, description="Interval of the QoS 0 health snapshot."
    )


class StoreBusSection(MqttSection):
    """The link to the store's own broker (store-api.md)."""

    max_concurrent_requests: int = Field(
        256, ge=1, le=10000, description="Store requests handled at once; more wait (backpressure)."
    )


class StorageSection(_Section):
    """The SQLite database: the outbox and all local state."""

    path: Path = Field(
        Path("/var/lib/store-gateway/gateway.db"),
        description="Database file; its directory is created when missing.",
    )
    max_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="Size bound of the database (with its WAL); new sales are refused (storage-full) beyond it.",
    )
    min_free_bytes: int = Field(
        64 << 20, ge=0, description="Free disk space kept in reserve; treated like max_bytes."
    )
    warn_fraction: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="Raise a storage alert when this fraction of the bound is used.",
    )
    retention_s: int = Field(
        604800,
        ge=0,
        description="Keep acknowledged events this long (for events.replay), as far as max_bytes allows.",
    )
    commit_max_rows: int = Field(
        2000, ge=1, le=100000, description="Most statements in one group commit."
    )


def _check_key(key: str) -> str:
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError("is not standard base64") from err
    if len(raw) != 32:
        raise ValueError(f"must decode to a raw 32-byte Ed25519 public key, got {len(raw)} bytes")
    return key


class SecuritySection(_Section):
    """Command signatures (cloud-api.md, Signature)."""

    command_keys: list[str] = Field(
        default_factory=list,
        description="Ed25519 public keys (base64 of the raw 32 bytes) that may sign commands; several for rotation.",
    )
    signed_commands: list[str] = Field(
        default_factory=lambda: ["locker.open"],
        description="Commands rejected without a valid signature.",
    )
    require_signatures: bool = Field(
        False, description="Require a valid signature on every command."
    )
    replay_window_s: int = Field(
        86400,
        ge=60,
        description="Remember command ids at least this long beyond their expiry (replay cache).",
    )
    clock_skew_s: int = Field(
        300, ge=0, description="Tolerated clock difference to the cloud when judging expiry."
    )

    @field_validator("command_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        return [_check_key(k) for k in keys]


class ClockSection(_Section):
    """Whether the system clock can be trusted."""

    synced: Literal["auto", "yes", "no"] = Field(
        "auto",
        description=(
            '"auto" reads the kernel NTP status; "yes" trusts the clock (battery RTC, test rigs); '
            '"no" never does.'
        ),
    )


class InventorySection(_Section):
    """Local stock."""

    stale_after_s: int = Field(
        86400, ge=1, description="Stock lookups say stale when no snapshot arrived for this long."
    )
    snapshot_expiry_s: int = Field(
        900, ge=1, description="An incomplete multi-part snapshot is dropped after this long."
    )


class PosSection(_Section):
    """Limits for requests from tills."""

    max_lines: int = Field(500, ge=1, le=10000, description="Most lines in one sale or return.")
    currencies: list[str] = Field(
        default_factory=lambda: ["EUR"], description="ISO 4217 currencies the store accepts."
    )


class LockersSection(_Section):
    """Click-and-collect rules common to all banks."""

    wrong_code_limit: int = Field(
        5,
        ge=1,
        description="Wrong codes at one bank within wrong_code_window_s before the keypad locks.",
    )
    wrong_code_window_s: int = Field(600, ge=1, description="Window for counting wrong codes.")
    lockout_s: int = Field(300, ge=1, description="How long the keypad stays locked.")
    load_close_timeout_s: int = Field(
        600, ge=1, description="How long staff may keep a compartment open while loading."
    )


class ControlSection(_Section):
    """The technician control socket."""

    socket: Path = Field(
        Path("/run/store-gateway/control.sock"),
        description="Unix socket path (mode 0660, group of the service user).",
    )
    enabled: bool = Field(True, description="Serve the control socket.")


class DiscoverySection(_Section):
    """Zeroconf advertisement and browsing."""

    enabled: bool = Field(
        True, description="Advertise _store-gateway._tcp and browse the LAN; failures only warn."
    )
    advertise_host: str | None = Field(
        None, description="Store broker host announced to tills (default: from store_bus.url)."
    )


class LoggingSection(_Section):
    """Log output (stdout; journald keeps it)."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level written."
    )
    format: Literal["auto", "json", "console"] = Field(
        "auto", description='"auto": JSON lines unless stdout is a terminal.'
    )


class GatewayConfig(_Section):
    """The whole configuration file."""

    schema_version: int = Field(
        SCHEMA_VERSION,
        description="Version of this file's layout; older files are migrated on load.",
    )
    store: StoreSection
    cloud: CloudSection
    store_bus: StoreBusSection
    storage: StorageSection = Field(default_factory=StorageSection)
    security: SecuritySection = Field(default_factory=SecuritySection)
    clock: ClockSection = Field(default_factory=ClockSection)
    inventory: InventorySection = Field(default_factory=InventorySection)
    pos: PosSection = Field(default_factory=PosSection)
    lockers: LockersSection = Field(default_factory=LockersSection)
    control: ControlSection = Field(default_factory=ControlSection)
    discovery: DiscoverySection = Field(default_factory=DiscoverySection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    payment_terminals: list[ZvtSettings] = Field(
        default_factory=list, description="ZVT card terminals."
    )
    locker_banks: list[LockerBankSettings] = Field(
        default_factory=list, description="Modbus locker banks."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> GatewayConfig:
        _unique("payment_terminals", [t.id for t in self.payment_terminals])
        _unique("locker_banks", [b.id for b in self.locker_banks])
        tills: dict[str, str] = {}
        for term in self.payment_terminals:
            for till in term.pos_terminals:
                if till in tills:
                    raise ValueError(
                        f"POS terminal {till!r} is routed to both {tills[till]!r} and {term.id!r}"
                    )
                tills[till] = term.id
        return self

    def payment_terminal_for(self, till: str) -> ZvtSettings | None:
        """The payment terminal configured for a POS terminal."""
        return next((t for t in self.payment_terminals if till in t.pos_terminals), None)


def _unique(section: str, ids: list[str]) -> None:
    seen: set[str] = set()
    for ident in ids:
        if ident in seen:
            raise ValueError(f"{section}: id {ident!r} is used twice")
        seen.add(ident)


# --- migrations -------------------------------------------------------------------------------

Migration = Callable[[dict[str, Any]], dict[str, Any]]
# schema_version N -> N+1. Version 1 is the first layout; add entries here when it changes.
MIGRATIONS: dict[int, Migration] = {}


def migrate(raw: dict[str, Any], *, path: str) -> dict[str, Any]:
    """Bring a raw config dict up to SCHEMA_VERSION; refuse versions from the future."""
    version = raw.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError("must be a positive integer", path=path, key="schema_version")
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"is {version}, but this gateway understands up to {SCHEMA_VERSION}; upgrade the gateway",
            path=path,
            key="schema_version",
        )
    while version < SCHEMA_VERSION:
        raw = MIGRATIONS[version](raw)
        version += 1
        raw["schema_version"] = version
    return raw


# --- environment overrides --------------------------------------------------------------------


def _parse_env_value(text: str) -> Any:
    """A TOML literal when it parses as one (numbers, booleans, arrays), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env_overrides(raw: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    """Apply ``STORE_GATEWAY__SECTION__KEY[__N__KEY]`` variables; returns the dotted keys set."""
    applied: list[str] = []
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        value = _parse_env_value(text)
        if not isinstance(value, str) and takes_text_only(field_at(parts)):
            value = text  # STORE_GATEWAY__CLOUD__PROTOCOL=5 means "5", not the number 5
        _set_path(raw, parts, value, origin=name)
        applied.append(".".join(parts))
    return applied


def field_at(parts: Sequence[str]) -> FieldInfo | None:
    """The model field a key path names (list entries by index: ``locker_banks.0.id``), or None."""
    model: type[BaseModel] | None = GatewayConfig
    field: FieldInfo | None = None
    rest = list(parts)
    while rest:
        if model is None:
            return None
        field = model.model_fields.get(rest.pop(0))
        if field is None:
            return None
        model = _model_of(field.annotation)
        listed = typing.get_origin(field.annotation) in (list, tuple)
        if model is not None and listed and rest and not rest.pop(0).isdigit():
            return None
    return field


def takes_text_only(field: FieldInfo | None) -> bool:
    """True for fields whose only valid values are text (str, Path, string Literals, optional)."""
    return field is not None and _text_annotation(field.annotation)


def _text_annotation(annotation: Any) -> bool:
    if annotation in (str, Path, type(None)):
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return all(isinstance(a, str) for a in args)
    if origin is Annotated:
        return _text_annotation(args[0])
    if origin in (typing.Union, types.UnionType):
        return all(_text_annotation(a) for a in args)
    return False


def _set_path(node: Any, parts: list[str], value: Any, *, origin: str) -> None:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"index {part!r} does not exist in the file", key=origin)
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError("points inside a value that is not a table", key=origin)


# --- loading ----------------------------------------------------------------------------------


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read and parse a TOML file; errors name the file (and line/column for syntax)."""
    p = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise ConfigError("file not found", path=p) from err
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror or err}", path=p) from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text (byte {err.start})", path=p) from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"invalid TOML: {err}", path=p) from err


def parse_config(raw: dict[str, Any], *, path: str = "<config>") -> GatewayConfig:
    """Validate a raw (already migrated) dict; errors name the dotted key."""
    try:
        return GatewayConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_first_problem(err), path=path, key=_first_key(err)) from err


def _first_key(err: ValidationError) -> str | None:
    loc = err.errors()[0]["loc"]
    return ".".join(str(x) for x in loc) or None


def _first_problem(err: ValidationError) -> str:
    first = err.errors()[0]
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "missing":
        msg = "required key is missing"
    more = err.error_count() - 1
    return msg + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def load_config(
    path: str | Path, *, env: Mapping[str, str] | None = None, check_secrets: bool = True
) -> tuple[GatewayConfig, list[str]]:
    """Load, migrate, override, validate; returns the config and warnings (unknown keys)."""
    p = str(path)
    raw = migrate(read_toml(path), path=p)
    apply_env_overrides(raw, os.environ if env is None else env)
    config = parse_config(raw, path=p)
    warnings = [f"{p}: unknown key {k!r} ignored (typo?)" for k in unknown_keys(raw, GatewayConfig)]
    if check_secrets:
        check_secret_files(config, path=p)
    return config, warnings


def unknown_keys(raw: Any, model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Dotted keys present in ``raw`` that no model field reads."""
    if not isinstance(raw, dict):
        return
    fields = model.model_fields
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        field = fields.get(key)
        if field is None:
            yield dotted
            continue
        sub = _model_of(field.annotation)
        if sub is None:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                yield from unknown_keys(item, sub, f"{dotted}.{i}.")
        else:
            yield from unknown_keys(value, sub, f"{dotted}.")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _secret_files(config: GatewayConfig) -> Iterator[tuple[str, Path]]:
    for name, section in (("cloud", config.cloud), ("store_bus", config.store_bus)):
        if section.password_file is not None:
            yield f"{name}.password_file", section.password_file
        if section.key_file is not None:
            yield f"{name}.key_file", section.key_file


def check_secret_files(config: GatewayConfig, *, path: str) -> None:
    """Refuse secret files that are missing or readable by group or others."""
    for key, secret in _secret_files(config):
        try:
            mode = secret.stat().st_mode
        except OSError as err:
            raise ConfigError(
                f"cannot read {secret}: {err.strerror or err}", path=path, key=key
            ) from err
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{secret} is readable by group or others (mode {stat.S_IMODE(mode):04o}); "
                f"run: chmod 600 {secret}",
                path=path,
                key=key,
            )


def read_secret(secret: Path) -> str:
    """The first line of a secret file, without its newline."""
    return secret.read_text(encoding="utf-8").splitlines()[0] if secret.stat().st_size else ""


# --- presentation -----------------------------------------------------------------------------


def redact(value: Any) -> Any:
    """A copy of a plain config structure with secret values replaced by ``***``."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if _is_secret_key(k) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _is_secret_key(key: str) -> bool:
    return key.lower() in _SECRET_KEYS or bool(
        re.fullmatch(r".*_(password|secret|token)", key.lower())
    )


def effective_dict(config: GatewayConfig) -> dict[str, Any]:
    """The effective configuration as JSON-able data, secrets redacted."""
    data: dict[str, Any] = redact(config.model_dump(mode="json"))
    return data


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file."""
    schema = GatewayConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "store-gateway configuration"
    return schema
