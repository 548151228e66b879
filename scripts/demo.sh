#!/usr/bin/env bash
# The system's main job on its embedded default, on a laptop: starts a local
# broker (installing it if missing) whose data persists under .local/, runs
# `paystream demo`, then stops the broker again.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
trap stop_broker EXIT
start_broker "sqlite://$LOCAL/nisshi.db"
export PAYSTREAM_BROKERS="${PAYSTREAM_BROKERS:-$BROKER_ADDR}"
export PAYSTREAM_DATABASE_URL="${PAYSTREAM_DATABASE_URL:-sqlite://$LOCAL/paystream.db}"
cargo run --release --locked --quiet --bin paystream -- demo "$@"
