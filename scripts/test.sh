#!/usr/bin/env bash
# Installs lmserve with its test needs (Chromium for the browser tests), then runs ruff, mypy and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
VENV="${LMSERVE_VENV:-.venv}"
PY="$VENV/bin/python"
"$PY" -m pip install --disable-pip-version-check -q -e ".[test]"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; browser tests will be skipped"
  else
    echo "warning: /usr/bin/chromium missing and not root; browser tests will be skipped"
  fi
fi
"$PY" -m ruff check lmserve tests
"$PY" -m ruff format --check lmserve tests
"$PY" -m mypy lmserve
"$PY" -m pytest -q -m "not gpu and not slow" "$@"
