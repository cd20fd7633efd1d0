# Sourced by demo.sh and test.sh from the project's root: makes .venv if it is missing
# ($PYTHON, default python3) and defines venv_install.

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi

# venv_install SPEC: pip install -e SPEC into .venv, quietly; on failure the last lines of
# .venv/install.log and exit 1.
venv_install() {
  local log=.venv/install.log
  if ! { .venv/bin/python -m pip install --quiet --upgrade pip \
         && .venv/bin/python -m pip install --quiet -e "$1"; } >"$log" 2>&1; then
    tail -20 "$log" >&2
    echo "installation failed (full log: $log)" >&2
    exit 1
  fi
}
