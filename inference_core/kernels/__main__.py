"""Build the CPU kernels: ``python -m inference_core.kernels [-v]`` (scripts/setup.sh runs it)."""

import sys

from inference_core.kernels import BUILD_DIR, NAME, build, cpu_flags

if "avx512_bf16" not in cpu_flags():
    print("inference_core.kernels: this CPU lacks AVX512-BF16; nothing to build")
    sys.exit(0)
build(verbose="-v" in sys.argv)
print(f"inference_core.kernels: {NAME} built in {BUILD_DIR}")
