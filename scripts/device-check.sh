#!/usr/bin/env bash
# The GPU check, in one call on a CUDA machine without a Rust toolchain (docs/CUDA.md):
# the device tests, `inspect`, and `bench -ngl 99` against llama.cpp's CUDA backend on every
# model in $MODELS. Results go under $OUT (default: target/device-check).
#
# Needs, carried from the build machine (scripts/build-cuda.sh --tests):
#   target/cuda/release/ffnskip, target/cuda/release/deps/device-<hash>
# and the models as GGUF files in $MODELS under their catalogue file names (default:
# target/gpu-models; a file split into NAME.gguf.part-* is joined first). They are linked into
# an ffnskip cache (FFNSKIP_HOME), where the tests' fetcher finds them without a network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/device-check}
MODELS=${MODELS:-target/gpu-models}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

# cuBLAS 13 from the machine's Python environment (the nvidia-cublas wheel), if not on the path.
if ! ldconfig -p 2>/dev/null | grep -q libcublas.so.13; then
  lib=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
  [ -n "$lib" ] && export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true

for parts in "$MODELS"/*.gguf.part-aa; do
  [ -e "$parts" ] || continue
  whole=${parts%.part-aa}
  [ -f "$whole" ] || cat "${whole}".part-* > "$whole"
done
export FFNSKIP_HOME=$PWD/target/gpu-home
mkdir -p "$FFNSKIP_HOME/models"
for m in "$MODELS"/*.gguf; do
  [ -e "$m" ] && ln -sf "$PWD/$m" "$FFNSKIP_HOME/models/$(basename "$m")"
done

# Binaries may travel xz-compressed (stripped, the CUDA build is ~74 MB; xz ~43 MB).
for z in target/cuda/release/ffnskip.xz target/cuda/release/deps/device-*.xz; do
  [ -e "$z" ] || continue
  xz -dc "$z" > "${z%.xz}" && chmod +x "${z%.xz}"
done
bin=target/cuda/release/ffnskip
"$bin" inspect | tee "$OUT/inspect.txt"

test_bin=$(ls target/cuda/release/deps/device-* 2>/dev/null | grep -v '\.d$\|\.xz$' | head -1)
if [ -n "$test_bin" ]; then
  timeout 300 "$test_bin" --test-threads 1 --nocapture 2>&1 | tee "$OUT/tests.txt"
fi

for m in "$MODELS"/*.gguf; do
  [ -e "$m" ] || continue
  name=$(basename "$m" .gguf)
  timeout 240 "$bin" bench -m "$m" -ngl 99 -t 4 --reps 3 \
    --skip none,adaptive:0.1,adaptive:0.25 | tee "$OUT/bench-$name.md"
done
