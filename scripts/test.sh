#!/usr/bin/env bash
# Set everything up (idempotent), then lint, type-check and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k state
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"
# pytest exits 5 when it collects no test; set -e turns that into a failure, as it should be.
.venv/bin/pytest "$@"
