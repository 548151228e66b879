#!/usr/bin/env bash
# Runs the whole test suite against a real broker and PostgreSQL, starting
# (and afterwards stopping) whatever is not already running.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
trap stop_broker EXIT
ensure_postgres
ensure_python
start_broker "memory://nisshi/"
export PAYSTREAM_TEST_BROKERS="$BROKER_ADDR"
export PAYSTREAM_TEST_DATABASE_URL="${PAYSTREAM_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
log "running the tests"
cargo test --workspace --locked "$@"
