#!/usr/bin/env bash
# Runs the whole test suite against a real broker and PostgreSQL, starting
# (and afterwards stopping) whatever is not already running.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
trap stop_broker EXIT
ensure_postgres
ensure_python
start_broker memory
export PAYSTREAM_TEST_BROKERS="$BROKER_ADDR"
export PAYSTREAM_TEST_DATABASE_URL="${PAYSTREAM_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
# Drop databases left behind by earlier runs (each test makes its own).
psql "$PAYSTREAM_TEST_DATABASE_URL" -Atc "SELECT datname FROM pg_database WHERE datname LIKE 'paystream_t_%'" 2>/dev/null |
  while read -r db; do psql "$PAYSTREAM_TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true; done
log "running the tests"
cargo test --workspace --locked "$@"
