# Source this (bash) to build cpmv with `--features cuda` on a machine without a GPU or a CUDA
# install: it installs CUDA 13.0's compiler, headers and libraries from PyPI wheels into
# $CPMV_CUDA_DIR (default ~/.cache/cpmv-cuda13, about 1.2 GB, once), links a stub of the driver
# library for the linker only, and exports CUDA_HOME, CUDA_COMPUTE_CAP=80 and
# CUDARC_CUDA_VERSION=13000 for candle's and cudarc's build scripts.
# Compute capability 8.0 on purpose: candle's and cpmv's kernels are embedded as PTX for it, which
# the driver compiles for the card on first use, so one build runs on A100 (sm_80), L40S / RTX
# 4090 (sm_89) and H100 / H200 (sm_90). Set CUDA_COMPUTE_CAP=90 for a Hopper-only build.
# CUDA 13.0 on purpose: the GPU machines' driver (580) runs PTX of 13.0, not of newer compilers.
# At run time the real driver and CUDA libraries must be on the library path, never the stub.
_cpmv_cuda() {
  local dir=${CPMV_CUDA_DIR:-$HOME/.cache/cpmv-cuda13} py cu root sys f b base
  py=$dir/venv/bin/python
  [ -x "$py" ] || python3 -m venv "$dir/venv" || return 1
  cu=$(ls -d "$dir"/venv/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -1)
  if [ -z "$cu" ] || [ ! -x "$cu/bin/nvcc" ]; then
    "$py" -m pip install -q "cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,cccl,crt,nvvm]==13.0.2" \
      || return 1
    cu=$(ls -d "$dir"/venv/lib/python3*/site-packages/nvidia/cu13 | head -1)
  fi
  [ -n "$cu" ] && [ -x "$cu/bin/nvcc" ] || { echo "cuda-env: no nvcc under $dir" >&2; return 1; }
  # NCCL 2.30: cudarc's bindings, and the first NCCL that runs two ranks on one GPU.
  local nccl=2.30.7
  "$py" -m pip show nvidia-nccl-cu13 2>/dev/null | grep -qx "Version: $nccl" \
    || "$py" -m pip install -q "nvidia-nccl-cu13==$nccl" || return 1
  # A CUDA_HOME layout (bin, include, nvvm, lib64) made of links into the wheels.
  root=$dir/root
  if [ ! -e "$root/lib64/libcublas.so" ]; then
    mkdir -p "$root/lib64/stubs"
    for f in bin include nvvm; do ln -sfn "$cu/$f" "$root/$f"; done
    for f in "$cu"/lib/*.so.* "$(dirname "$cu")"/nccl/lib/*.so.*; do
      [ -e "$f" ] || continue
      b=$(basename "$f"); base=${b%%.so.*}
      ln -sf "$f" "$root/lib64/$b"
      [ -e "$root/lib64/$base.so" ] || ln -s "$f" "$root/lib64/$base.so"
    done
    ln -sf "$(dirname "$cu")/nccl/include/nccl.h" "$root/include/nccl.h" 2>/dev/null || true
  fi
  # libcuda.so comes with the driver, not a wheel: link against a stub exporting the names cudarc
  # declares (from its sources, so `cargo fetch` must have run).
  if [ ! -e "$root/lib64/stubs/libcuda.so" ]; then
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1)
    [ -n "$sys" ] || { echo "cuda-env: run 'cargo fetch' first" >&2; return 1; }
    grep -oE 'fn cu[A-Za-z0-9_]+' "$sys" | cut -c4- | sort -u \
      | awk '{print "int " $1 "(void) { return 999; }"}' >"$root/lib64/stubs/stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib64/stubs/libcuda.so" "$root/lib64/stubs/stub.c" || return 1
  fi
  export CUDA_HOME=$root CUDA_PATH=$root PATH=$root/bin:$PATH CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80} \
    CUDARC_CUDA_VERSION=13000 LIBRARY_PATH=$root/lib64:$root/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
  echo "cuda-env: CUDA_HOME=$CUDA_HOME, $(nvcc --version | tail -1), sm_$CUDA_COMPUTE_CAP"
}
_cpmv_cuda || { echo "cuda-env: setup failed" >&2; return 1 2>/dev/null || exit 1; }
