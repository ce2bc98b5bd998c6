#!/usr/bin/env bash
# Aggregate decode throughput of `ffnskip serve` against llama.cpp's `llama-server`, 1 stream
# versus 8 concurrent streams, on one model file, loopback only.
#
#   bash scripts/serve-bench.sh
#   env: MODEL_FILE (.gguf; default: the smollm2-135m catalogue file), REPS=3, MAX_TOKENS=128,
#        PARALLEL=8, THREADS=2, SLOT_CTX=1024 (positions per slot), STREAMS=1,8,
#        FFNSKIP (binary, default target/release/ffnskip),
#        LLAMA_SERVER (binary; default: the one scripts/build-llama-server.sh built, if any),
#        BUILD_LLAMA=1 (build llama-server first when missing, ~10 min)
#
# Both servers run side by side (idle CPU of each is printed); reps alternate between them.
# `ffnskip serve -c` is positions per slot; llama-server's -c is the total it splits over
# its --parallel slots, so it gets PARALLEL x SLOT_CTX. Per (server, streams): median and
# min–max of completion tokens / wall seconds (first send to last answer), by
# scripts/serve_bench.py. Writes target/serve-bench/result.md and the servers' logs there.
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-3}
MAX_TOKENS=${MAX_TOKENS:-128}
PARALLEL=${PARALLEL:-8}
THREADS=${THREADS:-2}
SLOT_CTX=${SLOT_CTX:-1024}
STREAMS=${STREAMS:-1,8}
bin=${FFNSKIP:-target/release/ffnskip}
venv=target/openai-venv
out=target/serve-bench
START_TIMEOUT=300   # s for a server to answer /health 200
BENCH_TIMEOUT=1800  # s for all measurements

log() { echo "serve-bench: $*" >&2; }

[ -x "$bin" ] || { log "building $bin"; cargo build --release >&2; }
if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  log "creating $venv with the openai package"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q openai >&2
fi
py="$venv/bin/python"
MODEL_FILE=${MODEL_FILE:-$("$bin" inspect smollm2-135m | awk '/^file/{print $2}')}
[ -f "$MODEL_FILE" ] || { log "model file '$MODEL_FILE' not found"; exit 1; }

if [ -z "${LLAMA_SERVER:-}" ]; then
  if [ -x target/llama-server/build/bin/llama-server ] || [ "${BUILD_LLAMA:-0}" = 1 ]; then
    LLAMA_SERVER=$(bash scripts/build-llama-server.sh)
  fi
fi
[ -n "${LLAMA_SERVER:-}" ] || log "no llama-server (BUILD_LLAMA=1 builds it); ffnskip only"

mkdir -p "$out"
pids=()
cleanup() {
  local rc=$?
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_health PID URL: until URL/health answers 200, the process dies, or START_TIMEOUT.
wait_health() {
  for _ in $(seq $((START_TIMEOUT * 2))); do
    kill -0 "$1" 2>/dev/null || { log "server $1 exited while starting"; return 1; }
    [ "$(curl -s -o /dev/null -m 5 -w '%{http_code}' "$2/health" || true)" = 200 ] && return 0
    sleep 0.5
  done
  log "$2/health not 200 within ${START_TIMEOUT}s"
  return 1
}

# cpu_ticks PID: user+system clock ticks the process has used.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# ffnskip: -c is per slot; the port comes from its "listening on" line.
ours_cmd=("$bin" serve -m "$MODEL_FILE" --parallel "$PARALLEL" -t "$THREADS" -c "$SLOT_CTX"
          --host 127.0.0.1 --port 0)
"${ours_cmd[@]}" >"$out/ffnskip.out" 2>"$out/ffnskip.log" &
ours_pid=$!
pids+=("$ours_pid")
port=
for _ in $(seq $((START_TIMEOUT * 5))); do
  kill -0 "$ours_pid" 2>/dev/null || { log "ffnskip serve exited; see $out/ffnskip.log"; exit 1; }
  port=$(sed -n 's#^listening on http://[^ ]*:\([0-9][0-9]*\)/*$#\1#p' "$out/ffnskip.out" | head -1)
  [ -n "$port" ] && break
  sleep 0.2
done
[ -n "$port" ] || { log "no 'listening on' line from ffnskip serve"; exit 1; }
ours_url="http://127.0.0.1:$port"
wait_health "$ours_pid" "$ours_url"
commands="- ffnskip: \`${ours_cmd[*]/#$bin/ffnskip}\`"
servers=(--server "ffnskip=$ours_url")
idle_pids=("$ours_pid")

if [ -n "${LLAMA_SERVER:-}" ]; then
  lport=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  llama_cmd=("$LLAMA_SERVER" -m "$MODEL_FILE" --parallel "$PARALLEL" -t "$THREADS"
             -c $((PARALLEL * SLOT_CTX)) --port "$lport" --host 127.0.0.1)
  "${llama_cmd[@]}" >"$out/llama-server.log" 2>&1 &
  llama_pid=$!
  pids+=("$llama_pid")
  wait_health "$llama_pid" "http://127.0.0.1:$lport"
  commands="$commands"$'\n'"- llama-server: \`${llama_cmd[*]/#$LLAMA_SERVER/llama-server}\`"
  servers+=(--server "llama=http://127.0.0.1:$lport" --llama llama)
  idle_pids+=("$llama_pid")
fi

# Idle CPU over 2 s: a server that spins while idle would slow the other one's runs.
declare -A t0
for p in "${idle_pids[@]}"; do t0[$p]=$(cpu_ticks "$p"); done
sleep 2
hz=$(getconf CLK_TCK)
for p in "${idle_pids[@]}"; do
  pct=$(( ( $(cpu_ticks "$p") - t0[$p] ) * 100 / (2 * hz) ))
  log "idle CPU of server $p: ${pct}% of one core"
done

# Other work on the machine skews both servers (llama.cpp's spinning threads the most).
load1=$(cut -d' ' -f1 /proc/loadavg)
awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }' && log "warning: load average $load1 before the run; results will be noisy"
header="Model \`$(basename "$MODEL_FILE")\`, $(nproc) cores, load average $load1 at start, $(date -u +%Y-%m-%dT%H:%MZ)."$'\n\n'"$commands"
log "$(echo "$commands" | tr '\n' ' ')"
# In the background so that a signal to this script runs its trap at once.
timeout -k 10 "$BENCH_TIMEOUT" "$py" scripts/serve_bench.py "${servers[@]}" \
  --streams "$STREAMS" --reps "$REPS" --max-tokens "$MAX_TOKENS" \
  --header "$header" --out "$out/result.md" &
pids+=($!)
wait $!
log "wrote $out/result.md"
