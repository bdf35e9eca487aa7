#!/usr/bin/env bash
# Set everything up (idempotent), then start sentinel on the bundled model.
# Extra arguments go to `sentinel up`, e.g. scripts/run.sh --receiver oncall=http://127.0.0.1:9000/hook
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sentinel up "$@"
