#!/usr/bin/env bash
# Make sure PostgreSQL server binaries are present for the store tests.
#
# Idempotent: does nothing when /usr/lib/postgresql/*/bin/initdb already exists.
# The tests (tests/store/conftest.py) start their own throwaway cluster from
# these binaries on a free 127.0.0.1 port; no system service is started here.
# Set LORALOOM_TEST_POSTGRES_URL instead to use an existing server.
set -euo pipefail

have_server() {
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

if have_server; then
  echo "postgres.sh: server binaries present: $(compgen -G '/usr/lib/postgresql/*/bin/initdb' | head -n1)"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "postgres.sh: no apt-get here; install the PostgreSQL server yourself or set LORALOOM_TEST_POSTGRES_URL" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# The Debian package would also create and start a system cluster; tests do not need it.
$SUDO apt-get install -y -q --no-install-recommends postgresql

if ! have_server; then
  echo "postgres.sh: installed the postgresql package but found no initdb under /usr/lib/postgresql" >&2
  exit 1
fi
echo "postgres.sh: installed $(compgen -G '/usr/lib/postgresql/*/bin/initdb' | head -n1)"
