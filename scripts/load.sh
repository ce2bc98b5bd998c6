#!/usr/bin/env bash
# Load and fault test of `ffnskip serve` on loopback: starts the server, drives it with
# scripts/load.py for DURATION seconds at CONCURRENCY clients while sampling its RSS every
# 5 s, then stops it with SIGTERM and checks it exits 0 within 30 s.
#
#   bash scripts/load.sh [DURATION_S=600] [CONCURRENCY=32]
#   env: MODEL (name or .gguf, default: the server's default), PARALLEL=8, THREADS=2,
#        CTX (passed as -c when set), FFNSKIP (binary, default target/release/ffnskip),
#        EXTRA (more `serve` arguments, word-split), API_KEY (passed as --api-key when set)
#
# Writes target/load/: summary.json (load.py's summary), rss.csv (elapsed_s,rss_kib from the
# start of the load), server.log (server stderr), server.out (its stdout), load.log
# (load.py's stderr). Exit status 0 only if load.py passed, RSS stayed flat (last minute's
# max <= 1.1 x the max of the minute after warm-up) and the server exited 0 on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-${DURATION:-600}}
CONCURRENCY=${2:-${CONCURRENCY:-32}}
PARALLEL=${PARALLEL:-8}
THREADS=${THREADS:-2}
MODEL=${MODEL:-}
CTX=${CTX:-}
EXTRA=${EXTRA:-}
API_KEY=${API_KEY:-}
bin=${FFNSKIP:-target/release/ffnskip}
venv=target/openai-venv
out=target/load
START_TIMEOUT=300   # s for the "listening on" line and /health 200
STOP_TIMEOUT=30     # s for a graceful exit after SIGTERM
SAMPLE_EVERY=5      # s between RSS samples

log() { echo "load.sh: $*" >&2; }

# Whatever happens, the server and the load generator do not outlive this script.
server_pid=
sampler_pid=
load_pid=
cleanup() {
  local rc=$?
  [ -n "$load_pid" ] && kill -TERM "$load_pid" 2>/dev/null || true
  [ -n "$sampler_pid" ] && kill "$sampler_pid" 2>/dev/null || true
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    log "stopping server $server_pid"
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ ! -x "$bin" ]; then
  log "building $bin"
  cargo build --release >&2
fi
if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  log "creating $venv with the openai package"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q openai >&2
fi
py="$venv/bin/python"

mkdir -p "$out"
rm -f "$out/summary.json" "$out/rss.csv" "$out/server.log" "$out/server.out" "$out/load.log"


args=(serve --host 127.0.0.1 --port 0 --parallel "$PARALLEL" -t "$THREADS")
[ -n "$MODEL" ] && args+=(-m "$MODEL")
[ -n "$CTX" ] && args+=(-c "$CTX")
[ -n "$API_KEY" ] && args+=(--api-key "$API_KEY")
# shellcheck disable=SC2206
[ -n "$EXTRA" ] && args+=($EXTRA)
shown="${args[*]}"
log "$bin ${shown//"$API_KEY"/KEY}"
"$bin" "${args[@]}" >"$out/server.out" 2>"$out/server.log" &
server_pid=$!

# The port, from the one line the server prints once listening.
port=
for _ in $(seq $((START_TIMEOUT * 5))); do
  kill -0 "$server_pid" 2>/dev/null || { log "server exited early; see $out/server.log"; tail -20 "$out/server.log" >&2; exit 1; }
  port=$(sed -n 's#^listening on http://[^ ]*:\([0-9][0-9]*\)/*$#\1#p' "$out/server.out" | head -1)
  [ -n "$port" ] && break
  sleep 0.2
done
[ -n "$port" ] || { log "no 'listening on' line within ${START_TIMEOUT}s"; exit 1; }
base="http://127.0.0.1:$port"

# Ready once /health answers 200 (503 while the model loads).
ready=
for _ in $(seq $((START_TIMEOUT * 2))); do
  kill -0 "$server_pid" 2>/dev/null || { log "server exited while loading"; tail -20 "$out/server.log" >&2; exit 1; }
  code=$(curl -s -o /dev/null -m 5 -w '%{http_code}' ${API_KEY:+-H "Authorization: Bearer $API_KEY"} "$base/health" || true)
  [ "$code" = 200 ] && { ready=1; break; }
  sleep 0.5
done
[ -n "$ready" ] || { log "/health not 200 within ${START_TIMEOUT}s"; exit 1; }
log "server $server_pid ready at $base; load ${DURATION}s x $CONCURRENCY clients"

# RSS every SAMPLE_EVERY s while the load runs: elapsed seconds since its start, KiB.
t0=$(date +%s.%N)
(
  echo "elapsed_s,rss_kib"
  while kill -0 "$server_pid" 2>/dev/null; do
    rss=$(awk '/^VmRSS:/{print $2}' "/proc/$server_pid/status" 2>/dev/null || true)
    [ -n "$rss" ] && echo "$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{printf "%.1f", a-b}'),$rss"
    sleep "$SAMPLE_EVERY"
  done
) >"$out/rss.csv" &
sampler_pid=$!

# load.py bounds itself to DURATION + 120 s grace + 15 s settle; `timeout` is a backstop.
# In the background so that a signal to this script runs its trap at once.
load_rc=0
timeout -k 10 $((${DURATION%.*} + 240)) "$py" scripts/load.py --base "$base" \
  --duration "$DURATION" --concurrency "$CONCURRENCY" --out "$out/summary.json" \
  ${API_KEY:+--api-key "$API_KEY"} 2> >(tee "$out/load.log" >&2) &
load_pid=$!
wait "$load_pid" || load_rc=$?
load_pid=
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sampler_pid=
[ "$load_rc" = 0 ] || log "load.py failed (exit $load_rc)"

# RSS: first, max, last; flat = max of the last window <= 1.1 x max of the window after
# warm-up, windows 60 s (a third of the run when shorter than 180 s).
rss_ok=0
awk -F, -v dur="$DURATION" '
  BEGIN { n = 0 }
  NR == 1 { next }
  { t[n] = $1; r[n] = $2; n++ }
  END {
    if (n == 0) { print "rss: no samples"; exit 1 }
    w = dur >= 180 ? 60 : dur / 3
    mx = 0; ref = 0; last = 0
    for (i = 0; i < n; i++) {
      if (r[i] > mx) mx = r[i]
      if (t[i] >= w && t[i] < 2 * w && r[i] > ref) ref = r[i]
      if (t[i] >= t[n - 1] - w && r[i] > last) last = r[i]
    }
    if (ref == 0) { print "rss: too few samples for the flatness check"; exit 1 }
    flat = last <= 1.1 * ref
    printf "rss (MiB): first %.1f, max %.1f, last %.1f; window %ds: after warm-up max %.1f, last max %.1f -> %s\n",
      r[0] / 1024, mx / 1024, r[n - 1] / 1024, w, ref / 1024, last / 1024, flat ? "flat" : "NOT flat"
    exit flat ? 0 : 1
  }' "$out/rss.csv" || rss_ok=$?

# Graceful stop: SIGTERM, exit 0 within STOP_TIMEOUT.
stop_rc=0
kill -TERM "$server_pid"
for _ in $(seq $((STOP_TIMEOUT * 10))); do
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$server_pid" 2>/dev/null; then
  log "server still running ${STOP_TIMEOUT}s after SIGTERM; killing it"
  kill -KILL "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  stop_rc=1
else
  server_exit=0
  wait "$server_pid" || server_exit=$?
  if [ "$server_exit" = 0 ]; then
    log "server exited 0 after SIGTERM"
  else
    log "server exit status $server_exit after SIGTERM, want 0"
    stop_rc=1
  fi
fi
server_pid=

log "outputs: $out/summary.json $out/rss.csv $out/server.log"
if [ "$load_rc" = 0 ] && [ "$rss_ok" = 0 ] && [ "$stop_rc" = 0 ]; then
  log "PASS"
  exit 0
fi
log "FAIL (load.py $load_rc, rss $rss_ok, stop $stop_rc)"
exit 1
