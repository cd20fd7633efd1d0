#!/usr/bin/env bash
# Sets up a virtual environment and runs the whole test suite (SQLite and PostgreSQL).
# PostgreSQL: $MSSANTE_TEST_PG (default postgresql://postgres@127.0.0.1/test); without it the
# PostgreSQL half is skipped locally and fails under CI=true.
set -euo pipefail
cd "$(dirname "$0")"
. deploy/venv.sh
venv_install '.[test]'
exec .venv/bin/python -m pytest "$@"
