#!/usr/bin/env bash
# Builds ffnskip with `--features cuda` (ggml's CUDA backend, compiled by llama-cpp-sys-2) on a
# machine without a GPU, and without a system CUDA toolkit: the CUDA 13.0 toolkit comes from
# NVIDIA's cu13 Python wheels (nvcc, nvvm, runtime, cccl, cublas), installed with pip into
# target/cuda-toolkit and laid out as a toolkit root.
#
#   scripts/build-cuda.sh [cargo args…]    e.g. scripts/build-cuda.sh --tests
#
# Output: target/cuda/release/ffnskip (and test binaries with --tests). The binary links the
# CUDA runtime statically and cuBLAS 13 dynamically; it runs where the NVIDIA driver and
# libcublas.so.13 / libcublasLt.so.13 are (set LD_LIBRARY_PATH to their directory).
#
# Choices, each forced by what the wheels hold:
#   - CMAKE_CUDA_ARCHITECTURES (default 90, H100/H200; e.g. "80;89;90" for more) must be given:
#     without a GPU there is no native architecture to detect.
#   - GGML_CUDA_NO_VMM=ON: the wheels carry no libcuda stub to link the driver API against;
#     ggml then uses its legacy memory pool instead of virtual memory management.
#   - The wheels have no static cuBLAS: llama-cpp-sys-2 asks for cublas_static, cublasLt_static
#     and culibos, so empty archives stand in and the shared cuBLAS 13 is linked instead.
#   - The CPU code is built for x86-64-v3 (AVX2/FMA/F16C), not this machine's CPU, so the
#     binary runs on the GPU machine's host.
# The first build compiles ggml's CUDA kernels: expect an hour or more on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_VERSION=13.0
ARCHS=${CMAKE_CUDA_ARCHITECTURES:-90}
root=$PWD/target/cuda-toolkit
cu=$root/py/nvidia/cu13

if [ ! -x "$cu/bin/nvcc" ] || [ ! -x "$cu/nvvm/bin/cicc" ] || [ ! -f "$cu/include/crt/host_config.h" ]; then
  echo "installing the CUDA $CUDA_VERSION toolkit wheels into $root/py" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --no-deps --upgrade --target "$root/py" \
    "nvidia-cuda-nvcc==$CUDA_VERSION.*" "nvidia-nvvm==$CUDA_VERSION.*" \
    "nvidia-cuda-crt==$CUDA_VERSION.*" "nvidia-cuda-runtime==$CUDA_VERSION.*" \
    "nvidia-cuda-cccl==$CUDA_VERSION.*" "nvidia-cublas==$CUDA_VERSION.*" >&2
fi

# The toolkit layout CMake's FindCUDAToolkit and llama-cpp-sys-2 look for: lib64, unversioned
# shared objects, and the static libraries the sys crate names.
[ -e "$cu/lib64" ] || ln -s lib "$cu/lib64"
for l in cudart cublas cublasLt; do
  so=$(ls "$cu/lib/lib$l.so."* 2>/dev/null | head -1)
  [ -n "$so" ] || { echo "$cu/lib: no lib$l.so.* in the wheels" >&2; exit 1; }
  ln -sf "$(basename "$so")" "$cu/lib/lib$l.so"
done
stubs=$root/stubs/lib64
mkdir -p "$stubs"
for l in cublas_static cublasLt_static culibos; do
  [ -f "$stubs/lib$l.a" ] || ar rcs "$stubs/lib$l.a"
done
# `-lcuda`: nothing of the driver API is referenced with GGML_CUDA_NO_VMM, so an empty
# library with the driver's soname satisfies the linker.
if [ ! -f "$stubs/libcuda.so" ]; then
  echo "" | gcc -x c -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" -
fi

"$cu/bin/nvcc" --version | tail -2 >&2

# A configure that failed (e.g. before a wheel was added) leaves a cache the sys crate's
# build script takes as done; start that one over.
for b in target/cuda/release/build/llama-cpp-sys-2-*/out/build; do
  if [ -f "$b/CMakeCache.txt" ] && [ ! -f "$b/Makefile" ]; then rm -rf "$b"; fi
done

export PATH="$cu/bin:$PATH"
export CUDA_LIBRARY_PATH="$cu:$root/stubs"
export CUDACXX="$cu/bin/nvcc"
export CMAKE_CUDA_COMPILER="$cu/bin/nvcc"
export CMAKE_CUDA_ARCHITECTURES="$ARCHS"
export CUDAToolkit_ROOT="$cu"
export GGML_CUDA_NO_VMM=ON
export RUSTFLAGS="-C target-cpu=x86-64-v3 -C link-arg=-L$cu/lib -C link-arg=-lcublas -C link-arg=-lcublasLt"
exec cargo build --release --features cuda --target-dir target/cuda "$@"
