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

# The fault suite, short and seeded (a few hundred payments, every fault kind
# at least once), on PostgreSQL, with the machine to itself: the whole system
# as separate processes, checked from the outside (crates/chaos). The same
# seed reproduces a run; `paystream chaos --duration 30m` is the soak and
# `--backend sqlite` the embedded variant.
log "fault suite: paystream chaos (seed ${PAYSTREAM_CHAOS_SEED:-20261206})"
"${CARGO_TARGET_DIR:-$ROOT/target}/debug/paystream" chaos \
  --seed "${PAYSTREAM_CHAOS_SEED:-20261206}" --payments 200 \
  --postgres-url "$PAYSTREAM_TEST_DATABASE_URL"
