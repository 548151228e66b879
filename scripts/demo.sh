#!/usr/bin/env bash
# The system's main job on its embedded default, on a laptop: starts a local
# broker (installing it if missing) whose data persists in .local/, then
# `paystream up`: the PSP simulator, payment handler, executor and
# projections in one process on one SQLite database, ./paystream.db (the
# CLI's default, so every `paystream` command run from this folder finds the
# demo's data), a demo load of payments with mixed outcomes, and a summary
# that ends with what to try next.
#
# The broker keeps running afterwards (the README's commands read the
# topics); `scripts/demo.sh stop` stops it. Extra arguments go to
# `paystream up` (e.g. --payments 500, --keep-running).
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
if [ "${1:-}" = stop ]; then
  stop_detached_broker
  exit 0
fi
start_broker sqlite detach
export PAYSTREAM_BROKERS="${PAYSTREAM_BROKERS:-$BROKER_ADDR}"
log "building paystream (the first build takes a few minutes)"
cargo build --locked --quiet --bin paystream
bin="${CARGO_TARGET_DIR:-$ROOT/target}/debug/paystream"
status=0
"$bin" up "$@" || status=$?
log "the demo's broker keeps running on $BROKER_ADDR (data in .local/nisshi.db); stop it with: scripts/demo.sh stop"
exit $status
