#!/bin/bash
# FlashAttention-4 (CuTe DSL) and what it imports, as one archive for an offline GPU machine (Python 3.12,
# x86-64, torch >= 2.10 and cuda-bindings already there): the dense baseline of sep_attention_kernel.py.
#   bash benchmarks/fa4_bundle.sh FA_CHECKOUT [OUT]   # FA_CHECKOUT: github.com/Dao-AILab/flash-attention at
#                                                      # 0251105a (tag fa4-v4.0.0.beta27); OUT: default .fa4
# On the GPU machine (carry OUT; it is 52 MB, under the device tool's 64 MiB):
#   mkdir -p /tmp/fa4site && xz -dc .fa4/fa4site.tar.xz | tar -x -C /tmp/fa4site
#   export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
# (cutlass-dsl finds its own packages through a .pth file, which PYTHONPATH entries do not read.)
set -euo pipefail
src=$(cd "${1:?usage: fa4_bundle.sh FLASH_ATTENTION_CHECKOUT [OUT]}" && pwd)
out=$(mkdir -p "${2:-.fa4}" && cd "${2:-.fa4}" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# cutlass-dsl 4.6.2: FA4 asks for >= 4.6.2 and quack-kernels 0.6.4 pins it
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/whl" nvidia-cutlass-dsl==4.6.2 nvidia-cutlass-dsl-libs-base==4.6.2 \
    nvidia-cutlass-dsl-libs-core==4.6.2 nvidia-cutlass-dsl-libs-cu13==4.6.2 quack-kernels==0.6.4 \
    apache-tvm-ffi==0.1.13.post3 torch-c-dlpack-ext==0.1.5 protobuf==6.33.6 packaging==26.4
mkdir -p "$work/site/flash_attn"
for w in "$work"/whl/*.whl; do unzip -qo "$w" -d "$work/site"; done
cp -r "$src/flash_attn/cute" "$work/site/flash_attn/"  # a namespace package, as FA4's own wheel installs it
cd "$work/site"
# not needed on x86-64 Linux with torch >= 2.10: other platforms' stubs, build helpers, old-torch addons
rm -rf nvidia_cutlass_dsl/cu1*/lib/stubs build_backend.py tvm_ffi/3rdparty
rm -f torch_c_dlpack_ext/libtorch_c_dlpack_addon_torch*.so
find . -name __pycache__ -prune -exec rm -rf {} +
# the two large compiler libraries last and adjacent, so one large xz window spans both (~60 -> ~52 MB)
{ find . -type f ! -name 'libcute_dsl_runtime.so' ! -name '_cutlass_ir.cu1*.so' | LC_ALL=C sort
  find . -type f -name 'libcute_dsl_runtime.so'; find . -type f -name '_cutlass_ir.cu1*.so'; } > ../files.txt
tar -cf - -T ../files.txt | xz -T1 --x86 --lzma2=preset=9e,dict=384MiB > "$out/fa4site.tar.xz"
echo "$out/fa4site.tar.xz: $(du -h "$out/fa4site.tar.xz" | cut -f1)"
