#!/usr/bin/env bash
# The speed × quality frontier (issue 13, item 3). For each catalogue model: calibrate, then
# the distributed file and its requantizations to Q8_0, Q6_K, Q5_K, Q4_K and Q4_0, each at FFN
# skip 0–30% under the recommended rule (`auto` = adaptive + low-rank compensation), with the
# paper's rule and the baselines on the distributed file. Per point: decode tok/s (bench, with
# llama.cpp on the same file), weight bytes per token, KL divergence to the distributed file's
# full model (wikitext-2 test, teacher-forced), MBPP pass@1 for the coder models. Ends with
# `ffnskip frontier`: a table and a tok/s-versus-KLD chart per model.
#
# Requantizing dequantizes the distributed weights first, so every requantized file carries
# the distributed file's error plus its own (llama.cpp's `--allow-requantize` caveat): the
# KLD of a requantization is an upper bound on what quantizing the original weights would
# cost, and Q8_0/Q6_K from a 4–5-bit file cannot be better than the file itself.
#
# Usage: bash scripts/frontier.sh [WORKDIR]          (default target/frontier; resumable)
#   MODELS="smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b"  PHASES="prepare speed quality assemble"
#   REPS=3 GEN=32 CODE=10, and windows of 512 tokens per model: PPL_smollm2_135m=4 …
# About 70 minutes on 2 cores for all three models.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-target/frontier}
MODELS=${MODELS:-smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b}
PHASES=${PHASES:-prepare speed quality assemble}
QUANTS=${QUANTS:-q8_0 q6_k q5_k q4_k q4_0}
REPS=${REPS:-3}
GEN=${GEN:-32}
CODE=${CODE:-10}
RATIOS="0.05 0.1 0.15 0.2 0.25 0.3"
cargo build --release --quiet
mkdir -p "$W"
# A copy, so rebuilding while this runs changes nothing mid-sweep.
cp target/release/ffnskip "$W/ffnskip"
B=$W/ffnskip
has() { [[ " $PHASES " == *" $1 "* ]]; }
list() { local p=$1 out=""; for r in $RATIOS; do out="$out,$p:$r"; done; echo "${out#,}"; }
run() { echo "\$ ${*/#$B/ffnskip}" >> "$D/commands.txt"; echo "[$(date +%T)] ${*/#$B/ffnskip}" >&2; "$@"; }
AUTO=$(list auto)
for name in $MODELS; do
  D=$W/$name
  mkdir -p "$D"
  M=$($B inspect "$name" | awk '/^file/{print $2}')
  stem=$(basename "$M" .gguf)
  var=PPL_${name//[.-]/_}
  case $name in smollm2-135m) d=4 ;; qwen2.5-coder-1.5b) d=2 ;; *) d=3 ;; esac
  ppl=${!var:-$d}
  P=$D/profile.json
  files=("$M")
  for q in $QUANTS; do files+=("$D/$name-$q.gguf"); done
  if has prepare; then
    [ -f "$P" ] || run $B calibrate -m "$M" -t 2 -o "$P" > "$D/calibrate.txt"
    for q in $QUANTS; do
      # (stderr kept in a log: the requantization warning and the fallback summary)
      [ -f "$D/$name-$q.gguf" ] || run $B quantize "$M" "$D/$name-$q.gguf" --type "$q" \
          2> "$D/quantize-$q.log" || { cat "$D/quantize-$q.log" >&2; exit 1; }
    done
  fi
  if has speed; then
    margs=(); for f in "${files[@]}"; do margs+=(-m "$f"); done
    run $B bench "${margs[@]}" --skip "none,$AUTO" --skip-profile "$P" -t 2 --reps "$REPS" \
        --gen-tokens "$GEN" --prompt-tokens 64 --warmup 0 --json > "$D/bench.json"
    run $B bench -m "$M" --skip "adaptive:0.1,adaptive:0.25,placed+lowrank:0.25,adaptive-layer+lowrank:0.25,random:0.25,static:0.25,shortgpt:0.25,early-exit:0.25" \
        --skip-profile "$P" -t 2 --reps "$REPS" --gen-tokens "$GEN" --prompt-tokens 64 --warmup 0 \
        --json > "$D/bench-rules.json"
  fi
  if has quality; then
    RULES="$(list adaptive),adaptive+mean:0.1,adaptive+mean:0.25,placed+lowrank:0.1,placed+lowrank:0.25"
    RULES="$RULES,adaptive-layer+lowrank:0.25,static+lowrank:0.25,random:0.25,static:0.25,shortgpt:0.25,early-exit:0.25"
    run $B eval -m "$M" --task perplexity --skip "none,$AUTO,$RULES" --skip-profile "$P" \
        --limit "$ppl" --out "$D/eval" --json > "$D/ppl.json"
    ref=$(ls -d "$D"/eval/"$stem"-g*/perplexity | grep -v kld-vs | head -1)/none.jsonl
    for q in $QUANTS; do
      run $B eval -m "$D/$name-$q.gguf" --task perplexity --skip "none,$AUTO" --skip-profile "$P" \
          --limit "$ppl" --kld-reference "$ref" --out "$D/eval" --json > "$D/ppl-$q.json"
    done
    if [[ $name == qwen* ]]; then
      run $B eval -m "$M" --task code --skip "none,auto:0.1,auto:0.25,adaptive:0.25" \
          --skip-profile "$P" --limit "$CODE" --out "$D/eval" --json > "$D/code.json"
    fi
  fi
  if has assemble; then
    evals=(); for f in "$D"/ppl*.json "$D"/code.json; do [ -f "$f" ] && evals+=(--eval "$f"); done
    benches=(); for f in "$D"/bench*.json; do [ -f "$f" ] && benches+=(--bench "$f"); done
    mkdir -p docs/img
    $B frontier "${benches[@]}" "${evals[@]}" --title "$name: decode speed vs KL divergence (2 threads)" \
        --plot "docs/img/frontier-$name" > "$D/frontier.md"
    echo "wrote $D/frontier.md and docs/img/frontier-$name.{svg,png}"
  fi
done
if has assemble; then bash scripts/frontier-report.sh "$W"; fi
