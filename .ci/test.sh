#!/usr/bin/env bash
# The whole check: install what the tests need, lint, type-check, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
.venv/bin/ruff check gateway devices tests
.venv/bin/ruff format --check gateway devices tests
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
