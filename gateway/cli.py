"""``store-gateway``: the daemon (``run``) and the self-contained demonstration (``demo``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import structlog

from gateway import __version__
from gateway.config import default_config_path, load_config
from gateway.errors import ConfigError, DatabaseOpenError
from gateway.lifecycle import EarlyStop
from gateway.logs import configure_logging

EX_OK = 0
EX_FAILURE = 1
EX_CANTCREAT = 73
EX_CONFIG = 78


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="store-gateway", description="In-store edge gateway.")
    parser.add_argument("--version", action="version", version=f"store-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground (systemd runs exactly this)")
    run.add_argument(
        "--config",
        default=None,
        help="configuration file (default: $STORE_GATEWAY_CONFIG or /etc/store-gateway/gateway.toml)",
    )
    demo = sub.add_parser(
        "demo", help="a self-contained demonstration: no hardware, no configuration"
    )
    demo.add_argument(
        "--speed", type=float, default=1.0, help="time compression of the story (2 = twice as fast)"
    )
    demo.add_argument(
        "--keep", action="store_true", help="keep the temporary directory for inspection"
    )
    demo.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "embedded"],
        default="auto",
        help="auto: mosquitto when installed, else the embedded amqtt broker",
    )
    return parser


def run_command(config_path: str) -> int:
    """``store-gateway run``: exit codes per operations.md."""
    EarlyStop.install()
    try:
        config, warnings = load_config(config_path)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)  # noqa: T201 - the one clear message
        return EX_CONFIG
    configure_logging(config.logging.level, config.logging.format)
    log = structlog.get_logger("gateway")
    for warning in warnings:
        log.warning("configuration", problem=warning)
    from gateway.app import run_gateway  # noqa: PLC0415

    code = EX_OK
    try:
        asyncio.run(run_gateway(config, config_path=config_path))
    except* DatabaseOpenError as group:
        problem = str(group.exceptions[0])
        log.error("database unavailable", error=problem)
        print(f"database error: {problem}", file=sys.stderr)  # noqa: T201
        code = EX_CANTCREAT
    except* Exception as group:
        log.error("fatal error", error=repr(group.exceptions[0]), exc_info=group)
        code = EX_FAILURE
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``store-gateway`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run_command(args.config or default_config_path())
    from gateway.demo import run_demo  # noqa: PLC0415

    return int(run_demo(speed=args.speed, keep=args.keep, broker=args.broker))


if __name__ == "__main__":
    raise SystemExit(main())
