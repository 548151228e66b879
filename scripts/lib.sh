# Shared set-up steps for scripts/*.sh and .ci/run. Source it; every step is
# idempotent and installs only what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"
NISSHI_VERSION="0.8.1"
BROKER_ADDR="${PAYSTREAM_BROKER_ADDR:-127.0.0.1:9092}"
FASTAVRO_VERSION="1.13.1"
# Static validators of deploy/ (JSON Schema: the Compose spec, Kubernetes 1.37).
CHECK_JSONSCHEMA_VERSION="0.39.0"
KUBERNETES_VALIDATE_VERSION="1.37.0"
mkdir -p "$LOCAL"

# librdkafka's bundled configure script (mklove) fails when the folder it
# builds in has a space in its path ("ambiguous redirect"), and cargo builds
# it under the target dir. So a checkout whose path has a space builds in a
# space-free target dir of its own (one per checkout), unless the user chose
# one.
if [ -z "${CARGO_TARGET_DIR:-}" ] && [[ "$ROOT" == *" "* ]]; then
  CARGO_TARGET_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/paystream/target-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)"
  export CARGO_TARGET_DIR
  mkdir -p "$CARGO_TARGET_DIR"
fi

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# The Kafka-protocol broker for development and tests (see DESIGN.md). It
# needs a newer Rust than the project's stable toolchain, hence +nightly.
# Built at opt-level 1 without debug info: the broker is a test fixture
# here, and that cuts its build (the release default, opt-level 3, took
# 14 min 25 s on 2 idle cores; opt-level 1 took 14 min 24 s of CPU, i.e.
# 8-10 min on 2 cores) while it still carries the benchmarks' load.
# Only the storage engines the project runs are asked for (memory:// for
# tests, sqlite:// for the demo's durable broker); this shrinks nothing
# today, as one of nisshi's sub-crates pulls the PostgreSQL client in
# unconditionally, but states what we depend on. Installed once into
# ~/.cargo/bin and reused by every clone on the machine.
NISSHI_FEATURES="dynostore,libsql"
NISSHI_EXPECTED_MINUTES="8 to 10"
ensure_nisshi() {
  export PATH="$HOME/.cargo/bin:$PATH"
  if command -v nisshi >/dev/null 2>&1 && nisshi --version 2>/dev/null | grep -q "$NISSHI_VERSION"; then
    return
  fi
  if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain (only the broker needs it)"
    rustup toolchain install nightly --profile minimal
  fi
  log "installing nisshi $NISSHI_VERSION, the local Kafka-protocol broker: takes about $NISSHI_EXPECTED_MINUTES minutes on 2 cores, once per machine"
  local started
  started=$(date +%s)
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
    CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_INCREMENTAL=false \
    cargo +nightly install nisshi --version "$NISSHI_VERSION" --locked \
    --no-default-features --features "$NISSHI_FEATURES"
  log "nisshi installed in $(( $(date +%s) - started )) s"
}

port_open() {
  local host="${1%:*}" port="${1##*:}"
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

wait_port() {
  local addr="$1" what="$2"
  for _ in $(seq 1 150); do
    if port_open "$addr"; then return 0; fi
    sleep 0.2
  done
  log "$what did not come up on $addr"
  return 1
}

# Starts a broker on $BROKER_ADDR unless one is listening there already.
# $1: storage engine: "memory" (default; tests) or "sqlite" (durable, in
# $LOCAL/nisshi.db). The broker opens an sqlite:// URL relative to its
# working directory, so it runs from $LOCAL with a relative path: that works
# whatever the checkout's path (spaces included). $2: "detach" to leave it
# running after this script (the demo's broker). Sets BROKER_PID when it
# started one that this script should stop.
BROKER_PID=""
start_broker() {
  local engine="${1:-memory}" mode="${2:-}" storage
  if port_open "$BROKER_ADDR"; then
    log "a broker is already listening on $BROKER_ADDR; using it"
    return
  fi
  ensure_nisshi
  case "$engine" in
    memory) storage="memory://nisshi/" ;;
    sqlite) storage="sqlite://nisshi.db" ;;
    *) log "unknown broker storage $engine"; return 1 ;;
  esac
  log "starting nisshi on $BROKER_ADDR (storage $storage in $LOCAL)"
  local pid
  pid=$(
    cd "$LOCAL" &&
      { setsid nisshi broker \
        --listener-url "tcp://$BROKER_ADDR" \
        --advertised-listener-url "tcp://$BROKER_ADDR" \
        --storage-engine "$storage" \
        --group-initial-rebalance-delay 0s \
        >"$LOCAL/nisshi.log" 2>&1 </dev/null & echo $!; }
  )
  if [ "$mode" = detach ]; then
    echo "$pid" >"$LOCAL/nisshi.pid"
    echo "$BROKER_ADDR" >"$LOCAL/nisshi.addr"
  else
    BROKER_PID="$pid"
  fi
  wait_port "$BROKER_ADDR" "nisshi" || { tail -20 "$LOCAL/nisshi.log" >&2; return 1; }
}

stop_broker() {
  if [ -n "$BROKER_PID" ]; then
    kill "$BROKER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.1; done
    BROKER_PID=""
  fi
}

# Stops the detached demo broker (scripts/demo.sh stop).
stop_detached_broker() {
  local pidfile="$LOCAL/nisshi.pid"
  if [ -f "$pidfile" ]; then
    local pid
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      log "stopped the demo broker (pid $pid); its data stays in $LOCAL/nisshi.db"
    fi
    rm -f "$pidfile" "$LOCAL/nisshi.addr"
  else
    log "no demo broker running from this checkout"
  fi
}

# PostgreSQL for the integration tests (trust auth on 127.0.0.1:5432).
ensure_postgres() {
  if port_open 127.0.0.1:5432; then return; fi
  log "starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
  else
    log "PostgreSQL is not installed; install it (apt-get install postgresql) and retry"
    return 1
  fi
  wait_port 127.0.0.1:5432 "PostgreSQL"
}

# Python with fastavro, for the interoperability tests (an independent Avro
# implementation). Kept in a venv under .local/ so the system stays clean.
ensure_python() {
  local venv="$LOCAL/venv"
  if [ ! -x "$venv/bin/python" ]; then
    log "creating the Python venv for interop tests"
    python3 -m venv "$venv"
  fi
  if ! "$venv/bin/python" -c "import fastavro" 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check "fastavro==$FASTAVRO_VERSION"
  fi
  if ! "$venv/bin/check-jsonschema" --version 2>/dev/null | grep -q "$CHECK_JSONSCHEMA_VERSION" ||
    ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KUBERNETES_VALIDATE_VERSION"; then
    log "installing the deploy/ validators"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
  export PAYSTREAM_PYTHON="$venv/bin/python"
}
