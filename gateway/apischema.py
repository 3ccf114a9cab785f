"""JSON Schemas of every inbound message, generated from the models that validate them.

``python -m gateway.apischema --write`` regenerates ``docs/api/``; ``--check`` exits 1 when the
files are stale (a test does the same). The schemas come from the store-bus routes and the cloud
command table of a gateway built against a throwaway database, so they are exactly what the
running gateway accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from gateway.app import Gateway
from gateway.config import json_schema, parse_config
from gateway.logs import configure_logging

DOCS = Path(__file__).resolve().parent.parent / "docs" / "api"


async def _collect() -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config(
            {
                "store": {"id": "schema"},
                "cloud": {"url": "mqtt://127.0.0.1:1"},
                "store_bus": {"url": "mqtt://127.0.0.1:1"},
                "storage": {"path": str(Path(tmp) / "g.db")},
                "control": {"socket": str(Path(tmp) / "c.sock")},
                "discovery": {"enabled": False},
            }
        )
        gw = Gateway(config)
        async with AsyncExitStack() as stack:
            await gw.build(stack)
            store = {
                f"store/v1/{r.area}/{{{'terminal' if r.area == 'pos' else 'bank'}}}/{r.action}": {
                    "reply_topic_suffix": r.result,
                    "id_field": r.id_field,
                    "schema": r.model.model_json_schema(),
                }
                for r in sorted(gw.store_bus.routes.values(), key=lambda r: (r.area, r.action))
            }
            commands = {
                f"retail/v1/{{store}}/commands/{name}": {
                    "physical": spec.physical,
                    "data_schema": spec.data_model.model_json_schema(),
                }
                for name, spec in sorted(gw.dispatcher.table.items())
            }
    return {
        "store-api.schema.json": {"title": "store-gateway store API v1: requests", "topics": store},
        "cloud-commands.schema.json": {
            "title": "store-gateway cloud API v1: command data",
            "topics": commands,
        },
        "config.schema.json": json_schema(),
    }


def generate() -> dict[str, str]:
    """File name → JSON text of every schema document."""
    docs = asyncio.run(_collect())
    return {
        name: json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        for name, doc in docs.items()
    }


def main(argv: list[str] | None = None) -> int:
    """``--write`` regenerates docs/api; ``--check`` reports stale files (exit 1)."""
    parser = argparse.ArgumentParser(prog="python -m gateway.apischema")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    configure_logging("warning", "console", sys.stderr)
    stale = []
    for name, text in generate().items():
        path = DOCS / name
        if args.write:
            DOCS.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.exists() or path.read_text() != text:
            stale.append(name)
    for name in stale:
        print(f"stale: docs/api/{name}; run: python -m gateway.apischema --write", file=sys.stderr)  # noqa: T201
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
