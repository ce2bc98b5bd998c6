#!/usr/bin/env bash
# Coverage-guided fuzzing with AFL++ on the stable toolchain (cargo-afl). Not part of CI.
#
#   scripts/fuzz.sh TARGET SECONDS      TARGET: gguf | tokenizer | llama2c | chat_template
#
# One-time setup:  cargo install cargo-afl && cargo afl config --build
# Builds fuzz/ (its own workspace, target dir fuzz/target) when needed, writes the seed
# corpora (fuzz/seeds/) when missing, runs ONE afl-fuzz instance for SECONDS (resuming the
# corpus in fuzz/out/TARGET when there is one), then prints executions, exec/s, coverage
# and crashes/hangs from AFL's fuzzer_stats. Findings land in fuzz/out/TARGET/default/
# {crashes,hangs}/; reproduce one with `fuzz/target/release/TARGET < FILE`.
#
# Environment: FUZZ_TIMEOUT_MS (per-input time limit; slower inputs count as hangs, default
# 1000), TINYLLAMAS (llama2.c models for the seeds, default ../shared/models/tinyllamas),
# FUZZ_FRESH=1 (discard fuzz/out/TARGET and start from the seeds).
set -euo pipefail

target=${1:?usage: scripts/fuzz.sh TARGET SECONDS}
seconds=${2:?usage: scripts/fuzz.sh TARGET SECONDS}
case "$target" in
gguf | tokenizer | llama2c | chat_template) ;;
*)
    echo "unknown target '$target' (gguf, tokenizer, llama2c, chat_template)" >&2
    exit 2
    ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
fuzz="$root/fuzz"
out="$fuzz/out/$target"
cd "$fuzz"

if ! cargo afl --version >/dev/null 2>&1; then
    echo "cargo-afl is missing: cargo install cargo-afl && cargo afl config --build" >&2
    exit 1
fi

# Build (incremental; a no-op when up to date).
cargo afl build --release --quiet
bin="${CARGO_TARGET_DIR:-$fuzz/target}/release"

# Seeds and the tokenizer target's vocabulary.
if [[ ! -d seeds/$target || ! -f models/tok512.gguf ]]; then
    tinyllamas=${TINYLLAMAS:-$root/../shared/models/tinyllamas}
    "$bin/make_seeds" "$tinyllamas"
fi

dict=()
[[ -f dict/$target.dict ]] && dict=(-x "dict/$target.dict")

if [[ ${FUZZ_FRESH:-0} == 1 ]]; then
    rm -rf "$out"
fi
input=(-i "seeds/$target")
if [[ -f $out/default/fuzzer_stats ]]; then
    input=(-i -) # resume: continue from the queue already in $out
fi
mkdir -p "$fuzz/out"

# AFL_SKIP_CPUFREQ / AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES: shared machines where the CPU
# governor and core_pattern cannot be changed. AFL_NO_AFFINITY: other jobs share the cores.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
export AFL_NO_UI=1 AFL_QUIET=1 TOKENIZERS_PARALLELISM=false
log="$fuzz/out/$target.log"
echo "fuzzing $target for ${seconds}s (log: $log, findings: $out/default/{crashes,hangs})"
set +e
cargo afl fuzz "${input[@]}" -o "$out" "${dict[@]}" -t "${FUZZ_TIMEOUT_MS:-1000}" \
    -V "$seconds" -- "$bin/$target" >"$log" 2>&1
status=$?
set -e
stats="$out/default/fuzzer_stats"
if [[ ! -f $stats ]]; then
    echo "afl-fuzz exited with status $status and wrote no stats; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
fi

stat() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
crashes=$(find "$out/default/crashes" -type f -name 'id:*' 2>/dev/null | wc -l)
hangs=$(find "$out/default/hangs" -type f -name 'id:*' 2>/dev/null | wc -l)
cat <<EOF
target:            $target
fuzzing time:      $(stat run_time) s (all runs on fuzz/out/$target; the figures below too)
executions:        $(stat execs_done)
exec/s:            $(stat execs_per_sec)
coverage:          bitmap $(stat bitmap_cvg), edges $(stat edges_found) of $(stat total_edges)
corpus:            $(stat corpus_count) inputs ($(stat corpus_found) found by fuzzing)
crashes / hangs:   $(stat saved_crashes) / $(stat saved_hangs) (files: $crashes / $hangs)
stability:         $(stat stability)
EOF
