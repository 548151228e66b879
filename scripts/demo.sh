#!/usr/bin/env bash
# The system's main job on its embedded default, on a laptop: starts a local
# broker (installing it if missing) whose data persists under .local/, then
# `paystream up`: the PSP simulator, payment handler, executor and
# projections in one process on SQLite files under .local/, a demo load of
# payments with mixed outcomes, and a summary. Extra arguments go to
# `paystream up` (e.g. --payments 500, --keep-running).
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
trap stop_broker EXIT
start_broker "sqlite://$LOCAL/nisshi.db"
export PAYSTREAM_BROKERS="${PAYSTREAM_BROKERS:-$BROKER_ADDR}"
export PAYSTREAM_DATABASE_URL="${PAYSTREAM_DATABASE_URL:-sqlite://$LOCAL/paystream.db}"
cargo run --locked --quiet --bin paystream -- up "$@"
