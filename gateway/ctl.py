"""``gatewayctl``: the technician tool.

Subcommands live in one registry, :data:`COMMANDS`, keyed by their words (``("config", "set")``).
To add one, write a handler ``(ctx, args) -> int`` and register it with :func:`command`, giving
its help text and a function that adds its arguments; the parser tree (groups such as ``config``,
``outbox``; a word that is both a command and a group, such as ``devices``) is built from the keys.
Handlers report user errors by raising :class:`CtlError` (or ``ConfigError``, exit 78); ``main``
turns them into one line on stderr and an exit code, never a traceback.

Exit codes: 0 ok, 1 failure, 2 usage, 69 daemon unavailable, 78 configuration.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import tomlkit

from gateway import configfile
from gateway.config import ENV_PREFIX, default_config_path, effective_dict, load_config
from gateway.errors import ConfigError


class ExitCode(enum.IntEnum):
    """Process exit codes (sysexits where one fits)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    UNAVAILABLE = 69  # EX_UNAVAILABLE: the daemon is not running
    CONFIG = 78  # EX_CONFIG


class CtlError(Exception):
    """A user-facing failure: one line for stderr and the exit code to leave with."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Context:
    """What every handler gets: the configuration path and the output streams."""

    config_path: Path
    out: TextIO
    err: TextIO

    def say(self, text: str = "") -> None:
        """Write one line to stdout."""
        self.out.write(text + "\n")

    def warn(self, text: str) -> None:
        """Write one line to stderr."""
        self.err.write(text + "\n")


Handler = Callable[[Context, argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]


def _no_arguments(_parser: argparse.ArgumentParser) -> None:
    """A subcommand without arguments of its own."""


@dataclass(frozen=True, slots=True)
class Command:
    """One registered subcommand: its words, help, arguments and handler."""

    words: tuple[str, ...]
    summary: str
    run: Handler
    arguments: Arguments = _no_arguments


#: Every subcommand, by its words. Filled by :func:`command`.
COMMANDS: dict[tuple[str, ...], Command] = {}
#: Help of the command groups (a group is any proper prefix of a registered command).
GROUPS: dict[tuple[str, ...], str] = {
    ("config",): "read, check and change the configuration file",
}


def command(
    *words: str, summary: str, arguments: Arguments = _no_arguments
) -> Callable[[Handler], Handler]:
    """Register a handler as the subcommand ``words``."""

    def register(run: Handler) -> Handler:
        COMMANDS[words] = Command(words, summary, run, arguments)
        return run

    return register


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for every registered command."""
    parser = argparse.ArgumentParser(
        prog="gatewayctl", description="Technician tool for the store gateway."
    )
    _add_config_option(parser, default=default_config_path())
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): parser}
    subs: dict[tuple[str, ...], argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for words in sorted({w[:i] for w in COMMANDS for i in range(1, len(w) + 1)}):
        parent = words[:-1]
        if parent not in subs:
            # a group needs a subcommand unless it is a command itself (``devices``)
            subs[parent] = parsers[parent].add_subparsers(
                dest=f"_cmd{len(parent)}", metavar="COMMAND", required=parent not in COMMANDS
            )
        cmd = COMMANDS.get(words)
        text = cmd.summary if cmd else GROUPS.get(words, "")
        sub = subs[parent].add_parser(words[-1], help=text, description=text)
        _add_config_option(sub, default=argparse.SUPPRESS)
        if cmd is not None:
            cmd.arguments(sub)
            sub.set_defaults(_command=cmd)
        parsers[words] = sub
    return parser


def _add_config_option(parser: argparse.ArgumentParser, *, default: str) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=default,
        help="configuration file (default: $STORE_GATEWAY_CONFIG or /etc/store-gateway/gateway.toml)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gatewayctl`` with ``argv`` (default: the process arguments); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors and 0 after --help
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    cmd: Command | None = getattr(args, "_command", None)
    if cmd is None:
        parser.print_usage(sys.stderr)
        sys.stderr.write("gatewayctl: error: a command is required\n")
        return ExitCode.USAGE
    ctx = Context(Path(args.config), sys.stdout, sys.stderr)
    try:
        return cmd.run(ctx, args)
    except ConfigError as err:
        ctx.warn(f"config error: {err}")
        return ExitCode.CONFIG
    except CtlError as err:
        ctx.warn(f"gatewayctl: {err}")
        return err.code
    except OSError as err:  # permissions, read-only filesystems: the user's to fix, not a bug
        ctx.warn(f"gatewayctl: {err.strerror or err}: {err.filename or ctx.config_path}")
        return ExitCode.FAILURE
    except KeyboardInterrupt:
        return 130


# --- config -----------------------------------------------------------------------------------


def _init_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store-id", default=configfile.EXAMPLE_STORE_ID, help="store id to fill in"
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite an existing file (keeps a .bak)"
    )


@command(
    "config", "init", summary="write a commented starter configuration", arguments=_init_arguments
)
def config_init(ctx: Context, args: argparse.Namespace) -> int:
    """Write the starter file; refuse to overwrite without --force."""
    text = configfile.render_starter(args.store_id)
    configfile.check_document(tomllib.loads(text), path=str(ctx.config_path))
    try:
        backup = configfile.create_file(ctx.config_path, text, force=args.force)
    except configfile.TargetExists:
        raise CtlError(f"{ctx.config_path} already exists; use --force to replace it") from None
    ctx.say(f"wrote {ctx.config_path}" + (f" (previous file kept as {backup})" if backup else ""))
    return ExitCode.OK


@command("config", "validate", summary="check the file as the daemon would; exit 78 when invalid")
def config_validate(ctx: Context, _args: argparse.Namespace) -> int:
    """Exit 0 with a one-line summary, or 78 with the message ``store-gateway run`` prints."""
    config, warnings = load_config(ctx.config_path)
    for warning in warnings:
        ctx.warn(f"warning: {warning}")
    terminals, banks = len(config.payment_terminals), len(config.locker_banks)
    ctx.say(
        f"{ctx.config_path}: valid (store {config.store.id}, "
        f"{_count(terminals, 'payment terminal')}, {_count(banks, 'locker bank')})"
    )
    return ExitCode.OK


def _show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


@command(
    "config",
    "show",
    summary="the effective configuration, secrets redacted",
    arguments=_show_arguments,
)
def config_show(ctx: Context, args: argparse.Namespace) -> int:
    """Print the effective configuration (file + environment overrides), secrets redacted."""
    config, warnings = load_config(ctx.config_path, check_secrets=False)
    for warning in warnings:
        ctx.warn(f"warning: {warning}")
    data = effective_dict(config)
    if args.json:
        ctx.say(json.dumps(data, indent=2))
        return ExitCode.OK
    overrides = _env_overrides()
    ctx.say(f"# effective configuration of {ctx.config_path}, secrets redacted")
    if overrides:
        ctx.say(f"# overridden from the environment: {', '.join(overrides)}")
    ctx.out.write(render_effective(data))
    return ExitCode.OK


def _set_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "key", metavar="KEY", help="dotted key, e.g. cloud.url or locker_banks.0.endpoint"
    )
    parser.add_argument(
        "value", metavar="VALUE", help='a TOML literal (5, true, ["a"]) or plain text'
    )


@command(
    "config",
    "set",
    summary="change one key; validates, keeps comments and a .bak",
    arguments=_set_arguments,
)
def config_set(ctx: Context, args: argparse.Namespace) -> int:
    """Change one key; an invalid result exits 78 and leaves the file untouched."""
    outcome = configfile.set_key(ctx.config_path, args.key, args.value)
    for warning in outcome.warnings:
        ctx.warn(f"warning: {warning}")
    shown = _toml_text(outcome.value)
    if not outcome.changed:
        ctx.say(f"{outcome.key} = {shown} (unchanged)")
    else:
        ctx.say(f"{outcome.key} = {shown} (previous file kept as {outcome.backup})")
    return ExitCode.OK


@command("config", "schema", summary="print the JSON Schema of the configuration")
def config_schema(ctx: Context, _args: argparse.Namespace) -> int:
    """Print the JSON Schema (the same text as config/gateway.schema.json)."""
    ctx.out.write(configfile.render_schema())
    return ExitCode.OK


# --- presentation -----------------------------------------------------------------------------


def render_effective(data: dict[str, Any]) -> str:
    """Effective configuration as aligned, TOML-like text (``(not set)`` for absent values)."""
    scalars = {k: v for k, v in data.items() if not _is_table(v) and not _is_table_list(v)}
    chunks = [_aligned(scalars)]
    for key, value in data.items():
        if _is_table(value):
            chunks.append(f"[{key}]\n{_aligned(value)}")
        elif _is_table_list(value):
            chunks.extend(f"[[{key}]]\n{_aligned(item)}" for item in value)
    return "\n".join(c for c in chunks if c)


def _aligned(table: dict[str, Any]) -> str:
    if not table:
        return ""
    width = max(len(k) for k in table)
    lines = []
    for key, value in table.items():
        if _is_table_list(value):
            rows = "".join(f"    {_inline(row)},\n" for row in value)
            lines.append(f"{key.ljust(width)} = [\n{rows}]")
        else:
            lines.append(f"{key.ljust(width)} = {_toml_text(value)}")
    return "\n".join(lines) + "\n"


def _inline(row: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {_toml_text(v)}" for k, v in row.items()) + " }"


def _toml_text(value: Any) -> str:
    if value is None:
        return "(not set)"
    return str(tomlkit.item(value).as_string())


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _env_overrides() -> list[str]:
    return sorted(
        ".".join(p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p)
        for name in os.environ
        if name.startswith(ENV_PREFIX)
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# The operations subcommands (status, devices, locker, payment, outbox) register themselves.
from gateway import ctl_ops  # noqa: E402, F401

if __name__ == "__main__":
    # run the registry of gateway.ctl, which ctl_ops filled, not the copy named __main__
    from gateway.ctl import main as _main

    raise SystemExit(_main())
