"""Editing the configuration file: starter rendering, dotted-path edits, atomic replacement.

The starter file (``gatewayctl config init``, ``config/gateway.example.toml``) and the JSON
Schema (``config/gateway.schema.json``) are rendered from the pydantic models, so their comments
and defaults cannot drift from the code; ``python -m gateway.configfile --write`` regenerates the
checked-in copies. Edits go through tomlkit so comments and layout survive, are validated as a
whole document before anything is written, and replace the file atomically, leaving the
previous version beside it as ``<file>.<UTC yyyymmddTHHMMSSZ>.bak``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
import textwrap
import tomllib
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import annotated_types
import tomlkit
import tomlkit.exceptions
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from tomlkit.items import AoT, Array

from gateway.config import (
    ENV_PREFIX,
    SCHEMA_VERSION,
    GatewayConfig,
    field_at,
    json_schema,
    migrate,
    parse_config,
    read_toml,
    takes_text_only,
    unknown_keys,
)
from gateway.crashpoints import crash_point
from gateway.errors import ConfigError

EXAMPLE_STORE_ID = "store-0042"
STARTER_MODE = 0o640
SCHEMA_FILE = "gateway.schema.json"
EXAMPLE_FILE = "gateway.example.toml"
#: Group that must be able to read the file (the service's group), when it exists.
SERVICE_GROUP = "store-gateway"
_WIDTH = 100
_NBSP = "\N{NO-BREAK SPACE}"
_REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

# Example values for keys without a default (and a few worth showing), by dotted path without
# list indexes. A required key missing here makes rendering fail, so the starter cannot go stale.
_EXAMPLES: dict[str, Any] = {
    "schema_version": SCHEMA_VERSION,
    "cloud.url": "mqtts://broker.example.com:8883",
    "store_bus.url": "mqtt://127.0.0.1:1883",
    "payment_terminals.id": "pt-1",
    "payment_terminals.endpoint": "/dev/ttyUSB0",
    "payment_terminals.pos_terminals": ["pos-1", "pos-2"],
    "locker_banks.id": "A",
    "locker_banks.endpoint": "/dev/ttyUSB1",
    "locker_banks.compartments": [
        {"number": 1, "size": "S", "unit": 1, "channel": 0},
        {"number": 2, "size": "M", "unit": 1, "channel": 1},
    ],
}

_HEADER = f"""\
# store-gateway configuration (TOML).
#
# Rendered from the gateway's configuration model: every key is listed with what it means.
# Keys that are commented out show their default. Change a value with
#   gatewayctl config set KEY VALUE      (validates, keeps comments, leaves a .bak beside it)
# and check the file with `gatewayctl config validate`; `gatewayctl config schema` prints the
# JSON Schema. Environment variables {ENV_PREFIX}SECTION__KEY override values from this file.
# Secrets (passwords, private keys) live in separate files named by the *_file keys, readable
# only by the service user (chmod 600).
#
# Remove the example payment terminal and locker bank below if this store has none.
"""


class TargetExists(Exception):
    """The file to create already exists (and replacing it was not asked for)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists")
        self.path = path


@dataclass(frozen=True, slots=True)
class SetOutcome:
    """What ``set_key`` did: the value written, the backup kept, warnings about the file."""

    key: str
    value: Any
    changed: bool
    backup: Path | None
    warnings: tuple[str, ...]


# --- starter file and schema ------------------------------------------------------------------


def render_schema() -> str:
    """The JSON Schema of the configuration as the text of ``gateway.schema.json``."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def render_starter(store_id: str = EXAMPLE_STORE_ID) -> str:
    """A commented starter configuration, every key documented; it validates as it is."""
    examples = {**_EXAMPLES, "store.id": store_id}
    scalars, tables, lists = [], [], []
    # top-level keys first: after a [table] header they would land inside that table
    for name, field in GatewayConfig.model_fields.items():
        item = _item_model(field.annotation)
        if item is None:
            scalars.append(_comment(field) + _key_line(name, field, name, examples))
        elif _is_sequence(field.annotation):
            doc = _comment(field, note=f"One [[{name}]] table each.")
            lists.append(f"{doc}[[{name}]]\n{_table_body(item, name, examples)}")
        else:
            doc = _comment_text(item.__doc__ or "")
            tables.append(f"{doc}[{name}]\n{_table_body(item, name, examples)}")
    return "\n".join([_HEADER, *scalars, *tables, *lists])


def _table_body(model: type[BaseModel], prefix: str, examples: dict[str, Any]) -> str:
    lines = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}.{name}"
        item = _item_model(field.annotation)
        if item is not None:
            lines.append(_comment(field) + _inline_rows(item, dotted, examples))
        else:
            lines.append(_comment(field) + _key_line(name, field, dotted, examples))
    return "".join(lines)


def _inline_rows(model: type[BaseModel], dotted: str, examples: dict[str, Any]) -> str:
    """A list of sub-tables as an inline array, its fields documented in the comment above."""
    docs = "".join(_comment(f, lead=f"  {n}: ") for n, f in model.model_fields.items())
    rows = "".join(f"  {_toml_inline(row)},\n" for row in _example(dotted, examples))
    return f"{docs}{dotted.rsplit('.', 1)[-1]} = [\n{rows}]\n"


def _key_line(name: str, field: FieldInfo, dotted: str, examples: dict[str, Any]) -> str:
    if dotted in examples or field.is_required():
        return f"{name} = {_toml_value(_example(dotted, examples))}\n"
    default = field.get_default(call_default_factory=True)
    if default is None:
        return f"# {name} =    (not set by default)\n"
    return f"# {name} = {_toml_value(default)}\n"


def _example(dotted: str, examples: dict[str, Any]) -> Any:
    try:
        return examples[dotted]
    except KeyError:
        raise LookupError(
            f"no example value for required key {dotted}; add one to _EXAMPLES"
        ) from None


def _comment(field: FieldInfo, *, lead: str = "", note: str = "") -> str:
    parts = [field.description or "", note, _constraints(field)]
    return _comment_text(" ".join(p for p in parts if p), lead=lead)


def _comment_text(text: str, *, lead: str = "") -> str:
    indent = " " * len(lead)
    wrapped = textwrap.wrap(text, _WIDTH - 2, initial_indent=lead, subsequent_indent=indent)
    return "".join(f"# {line}\n".replace(_NBSP, " ") for line in wrapped)


def _constraints(field: FieldInfo) -> str:
    """Bounds from the field's metadata, e.g. ``[>= 5, <= 3600]``, and whether it is required."""
    words = {
        annotated_types.Ge: ("ge", ">= {}"),
        annotated_types.Gt: ("gt", "> {}"),
        annotated_types.Le: ("le", "<= {}"),
        annotated_types.Lt: ("lt", "< {}"),
        annotated_types.MultipleOf: ("multiple_of", "multiple of {}"),
        annotated_types.MinLen: ("min_length", "length >= {}"),
        annotated_types.MaxLen: ("max_length", "length <= {}"),
    }
    found = []
    for meta in field.metadata:
        attr, template = words.get(type(meta), ("", ""))
        if attr:
            found.append(template.format(getattr(meta, attr)))
    if field.is_required():
        found.append("required")
    # no-break spaces keep the bracket on one line when the comment wraps
    return f"[{', '.join(found)}]".replace(" ", _NBSP) if found else ""


def _toml_value(value: Any) -> str:
    return str(tomlkit.item(_plain(value)).as_string())


def _toml_inline(row: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in row.items()) + " }"


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _item_model(annotation: Any) -> type[BaseModel] | None:
    """The model class inside ``Model``, ``list[Model]``, ``tuple[Model, ...]`` or ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _item_model(arg)
        if found is not None:
            return found
    return None


def _is_sequence(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (list, tuple)


# --- dotted-path edits ------------------------------------------------------------------------


def field_for(dotted: str) -> FieldInfo:
    """The model field a dotted key (``payment_terminals.0.endpoint``) names; ConfigError if none."""
    field = field_at(dotted.split("."))
    if field is None:
        raise ConfigError("unknown key (see `gatewayctl config schema`)", key=dotted)
    if _item_model(field.annotation) is not None:
        raise ConfigError("is a section or list of tables; set one of its keys", key=dotted)
    return field


def parse_value(text: str, field: FieldInfo) -> Any:
    """VALUE as a TOML literal when it parses as one, else the plain string.

    A field that only takes text (``store.id``, ``cloud.protocol``) keeps the text as typed,
    so ``5`` stays ``"5"`` and is not turned into a number.
    """
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if not isinstance(value, str) and takes_text_only(field):
        return text
    return value


def set_in_document(doc: tomlkit.TOMLDocument, dotted: str, value: Any) -> None:
    """Set a dotted key in a tomlkit document, creating missing tables; lists need an index."""
    node: Any = doc
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, AoT | Array | list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"there is no entry {part} ({len(node)} in the file)", key=where)
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif last:
            node[part] = value
        elif part in node:
            node = node[part]
        else:
            node[part] = tomlkit.table()
            node = node[part]


def check_document(data: dict[str, Any], *, path: str) -> list[str]:
    """Validate a whole raw document (migrated, no env overrides); returns unknown-key warnings."""
    raw = migrate(copy.deepcopy(data), path=path)
    parse_config(raw, path=path)
    return [f"{path}: unknown key {k!r} ignored (typo?)" for k in unknown_keys(raw, GatewayConfig)]


def set_key(path: Path, dotted: str, text: str, *, now: datetime | None = None) -> SetOutcome:
    """Change one key of the file; validate the result first; replace atomically with a backup."""
    where = str(path)
    read_toml(path)  # the same messages as the daemon for missing, unreadable or broken files
    old = path.read_text(encoding="utf-8")
    try:
        doc = tomlkit.parse(old)
    except tomlkit.exceptions.ParseError as err:
        raise ConfigError(f"invalid TOML: {err}", path=where) from err
    try:
        value = parse_value(text, field_for(dotted))
        set_in_document(doc, dotted, value)
    except ConfigError as err:
        raise ConfigError(err.problem, path=where, key=err.key) from err
    warnings = check_document(doc.unwrap(), path=where)
    new = doc.as_string()
    if new == old:
        return SetOutcome(dotted, value, changed=False, backup=None, warnings=tuple(warnings))
    backup = replace_file(path, new, now=now)
    return SetOutcome(dotted, value, changed=True, backup=backup, warnings=tuple(warnings))


# --- atomic writes ----------------------------------------------------------------------------


def create_file(
    path: Path, text: str, *, force: bool = False, now: datetime | None = None
) -> Path | None:
    """Write a new file with mode 0640; TargetExists unless ``force`` (then back up the old)."""
    path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    if force and path.exists():
        return replace_file(path, text, now=now, mode=STARTER_MODE)
    gid = _service_gid()
    tmp = _write_temp(path, text.encode("utf-8"), STARTER_MODE, os.geteuid(), gid)
    try:
        os.link(tmp, path)  # fails if the file appeared meanwhile: never clobber without --force
    except FileExistsError:
        raise TargetExists(path) from None
    finally:
        tmp.unlink()
    _fsync_dir(path.parent)
    return None


def replace_file(
    path: Path, text: str, *, now: datetime | None = None, mode: int | None = None
) -> Path:
    """Replace ``path`` atomically keeping its mode and owner; returns the backup of the old file."""
    target = Path(os.path.realpath(path))  # a symlinked config stays a symlink
    st = target.stat()
    keep_mode = mode if mode is not None else st.st_mode & 0o7777
    tmp = _write_temp(target, text.encode("utf-8"), keep_mode, st.st_uid, st.st_gid)
    try:
        backup = _backup(target, now or datetime.now(UTC))
        crash_point("config-write")  # new file written and synced, old one backed up, not renamed
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return backup


def backup_name(path: Path, now: datetime) -> Path:
    """``<file>.<UTC yyyymmddTHHMMSSZ>.bak`` beside ``path``."""
    return path.with_name(f"{path.name}.{now.astimezone(UTC):%Y%m%dT%H%M%SZ}.bak")


def _backup(path: Path, now: datetime) -> Path:
    """Keep the current file under a backup name (a hard link: atomic, same mode and owner)."""
    base = backup_name(path, now)
    for n in range(1, 100):
        candidate = base if n == 1 else base.with_name(f"{base.name[:-4]}-{n}.bak")
        try:
            os.link(path, candidate)
        except FileExistsError:
            continue
        except OSError:  # a filesystem without hard links: copy, keeping mode and owner
            shutil.copy2(path, candidate)
            st = path.stat()
            with contextlib.suppress(PermissionError):
                os.chown(candidate, st.st_uid, st.st_gid)
        return candidate
    raise FileExistsError(f"too many backups of {path} within one second")


def _write_temp(path: Path, data: bytes, mode: int, uid: int, gid: int) -> Path:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), mode)
            if (uid, gid) != (os.geteuid(), os.getegid()):
                os.fchown(fh.fileno(), uid, gid)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _service_gid() -> int:
    """The service group when running as root and it exists (so the daemon can read the file)."""
    if os.geteuid() != 0:
        return os.getegid()
    import grp  # noqa: PLC0415 - POSIX only, and only needed here

    try:
        return grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return os.getegid()


# --- generator --------------------------------------------------------------------------------


def artefacts() -> Iterator[tuple[str, str]]:
    """(file name, text) of each generated file in ``config/``."""
    yield EXAMPLE_FILE, render_starter()
    yield SCHEMA_FILE, render_schema()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway.configfile --write|--check``: regenerate or verify the artefacts."""
    parser = argparse.ArgumentParser(prog="python -m gateway.configfile", description=main.__doc__)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="regenerate the files")
    action.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    parser.add_argument("--dir", type=Path, default=_REPO_CONFIG_DIR, help="target directory")
    args = parser.parse_args(argv)
    stale = []
    for name, text in artefacts():
        target = args.dir / name
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            continue
        if args.write:
            target.write_text(text, encoding="utf-8")
            sys.stdout.write(f"wrote {target}\n")
        else:
            stale.append(str(target))
    if stale:
        sys.stderr.write(f"stale: {', '.join(stale)}; run: python -m gateway.configfile --write\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
