#!/usr/bin/env bash
# Sets up a virtual environment and runs the whole test suite (SQLite and PostgreSQL).
# PostgreSQL: $MSSANTE_TEST_PG (default postgresql://postgres@127.0.0.1/test); without it the
# PostgreSQL half is skipped locally and fails under CI=true.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
install_log=.venv/install.log
if ! { .venv/bin/python -m pip install --quiet --upgrade pip \
       && .venv/bin/python -m pip install --quiet -e '.[test]'; } >"$install_log" 2>&1; then
  tail -20 "$install_log" >&2
  echo "installation failed (full log: $install_log)" >&2
  exit 1
fi
exec .venv/bin/python -m pytest "$@"
