#!/usr/bin/env bash
# FlashAttention-4 (attention=fa4) for an offline GPU machine with Python 3.12 and torch >= 2.9 (CUDA 13):
# downloads the wheels `pip install ".[fa4]"` (from a checkout) would install into DIR (default .fa4whl).
#
#   bash scripts/fa4-wheels.sh [DIR]
#   # on the GPU machine:
#   pip install --no-index --no-deps DIR/*.whl
#   # with `pip install --target T` instead, the .pth of nvidia-cutlass-dsl is not run: also
#   export PYTHONPATH=T:T/nvidia_cutlass_dsl/dsl_packages
#   and install every cutlass-dsl wheel in one call (or the later ones with --upgrade): a second
#   `pip install --target T` skips the folders that already exist there, and FA4 then fails with
#   "No CTK flavor installed" or "No module named 'cutlass.cute'".
#
# nvidia-cutlass-dsl-libs-cu13 is a 92 MB wheel (the CuTe DSL compiler); where a transfer is limited
# (the lent device takes 64 MiB a call), SPLIT=45000000 cuts it into parts to `cat` together there.
set -euo pipefail
DIR=${1:-.fa4whl}
mkdir -p "$DIR"
for p in flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
         nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 \
         apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$DIR" "$p"
done
if [ -n "${SPLIT:-}" ]; then
  big=$(ls "$DIR"/nvidia_cutlass_dsl_libs_cu13-*.whl)
  split -b "$SPLIT" "$big" "$big.part." && rm "$big"
  echo "split $big into $(ls "$big".part.* | wc -l) parts: cat them back into $(basename "$big") before installing"
fi
ls -la "$DIR"
