#!/usr/bin/env bash
# CI: the README's first command exactly as a new user runs it, from a fresh
# clone at a path with a space in it, with no broker listening on the port
# it uses (its own, so the test suite's broker is not in the way), a small
# load; then the README's "Using it" commands on the demo's data. Asserts on
# the summary: every payment final, ledger verify ok, reconciliation clean,
# no ERROR lines, and the next steps printed. The clone shares this
# checkout's cargo target dir only to save CI the second full build.
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

port=19092
while port_open "127.0.0.1:$port"; do port=$((port + 1)); done
work="$(mktemp -d)/first run"
mkdir -p "$work"
log "first run: fresh clone in '$work', broker on 127.0.0.1:$port"
git clone --quiet --no-hardlinks "$ROOT" "$work/paystream"
clone="$work/paystream"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export PAYSTREAM_BROKER_ADDR="127.0.0.1:$port"
out="$work/demo.out"

cleanup() { (cd "$clone" && scripts/demo.sh stop) >/dev/null 2>&1 || true; }
trap cleanup EXIT

fail() {
  log "first run FAILED: $*"
  sed 's/^/  | /' "$out" >&2
  exit 1
}

started=$(date +%s)
(cd "$clone" && scripts/demo.sh --payments 300 --random-ports) >"$out" 2>&1 ||
  fail "scripts/demo.sh exited non-zero"
log "first run: scripts/demo.sh took $(( $(date +%s) - started )) s"

grep -qE '^  not final +0$' "$out" || fail "payments left non-final"
grep -q '^ledger verify: ok$' "$out" || fail "ledger verify did not pass"
grep -q '^reconciliation .*: clean$' "$out" || fail "reconciliation not clean"
if grep -q '^reconciliation .*DIFFERENCES$' "$out"; then fail "reconciliation differences"; fi
if grep -E '(^| )ERROR( |$)' "$out"; then fail "ERROR lines in the demo's output"; fi
grep -q "^what to try next:" "$out" || fail "no next steps in the summary"
grep -q "Authorization: Bearer psk_" "$out" || fail "no ready-to-paste curl with the demo key"

# The README's "Using it" commands, from the clone, as the summary says.
path_line=$(grep -m1 '^  export PATH=' "$out" | sed 's/^  //; s/ *#.*$//')
[ -n "$path_line" ] || fail "no PATH hint"
(
  cd "$clone"
  eval "$path_line"
  export PAYSTREAM_BROKERS="$PAYSTREAM_BROKER_ADDR"
  set -x
  paystream projection status
  paystream ledger verify
  paystream replay --topic payments --format jsonl --out payments.jsonl
  test -s payments.jsonl
  paystream dlq list
  paystream offsets show --group paystream.ledger
  paystream offsets reset --group paystream.wallet --to-datetime 2026-11-25T00:00:00Z
  paystream replay --topic payments --from 2026-11-25T00:00:00Z --format avro --out day.avro
  test -s day.avro
  paystream project --into sqlite://analysis.db --as-of 2099-01-01T00:00:00Z
  paystream projection rebuild ledger
  paystream ledger balance merchant_payable:demo-shop/seller-01 --as-of 2026-11-25T12:00:00Z
) >>"$out" 2>&1 || fail "a README command failed on the demo's data"
log "first run passed"
