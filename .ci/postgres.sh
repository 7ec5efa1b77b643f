#!/usr/bin/env bash
# A private PostgreSQL server on loopback for the shared-Optuna-study test.
#   bash .ci/postgres.sh start   -> prints the SQLAlchemy URL (everything else goes to stderr)
#   bash .ci/postgres.sh stop    -> stops it (nothing to do when it is not running)
# Both are idempotent. GCODE_EXP_PG_DIR (data folder) and GCODE_EXP_PG_PORT pick a private server.
# Installs Debian's postgresql when its binaries are missing (needs root and the package registry).
set -euo pipefail
PGDIR=${GCODE_EXP_PG_DIR:-/tmp/gcode-exp-pg}
PORT=${GCODE_EXP_PG_PORT:-54329}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }

case "${1:-}" in
  start)
    if [ -z "$(pg_bin)" ]; then
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >&2
    fi
    BIN=$(pg_bin)
    if [ ! -f "$PGDIR/PG_VERSION" ]; then
      mkdir -p "$PGDIR"
      [ "$(id -u)" = 0 ] && chown postgres "$PGDIR"
      as_pg "$BIN/initdb -D $PGDIR -A trust -U postgres" >&2
    fi
    if ! as_pg "$BIN/pg_ctl -D $PGDIR status" >/dev/null 2>&1; then
      as_pg "$BIN/pg_ctl -D $PGDIR -l $PGDIR/server.log -w -o \"-p $PORT -k $PGDIR -c listen_addresses=127.0.0.1\" start" >&2
    fi
    echo "postgresql://postgres@127.0.0.1:$PORT/postgres"
    ;;
  stop)
    BIN=$(pg_bin)
    if [ -n "$BIN" ] && [ -f "$PGDIR/PG_VERSION" ] && as_pg "$BIN/pg_ctl -D $PGDIR status" >/dev/null 2>&1; then
      as_pg "$BIN/pg_ctl -D $PGDIR -m fast -w stop" >&2
    fi
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
