#!/usr/bin/env bash
# Rebuild TorchRL's C++ extension (torchrl._torchrl: the segment trees of its prioritized sampler)
# against the torch installed in the active Python, for the replay part of `python -m bench`.
#
#   bash bench/rebuild_torchrl_ext.sh [PYTHON]      # default: python3 on PATH (use your venv's)
#
# Why: the torchrl wheels on PyPI (0.11-0.14) are built against a different torch; with
# torch 2.13.0+cpu `import torchrl._torchrl` fails with "undefined symbol
# _ZN5torch8autograd13_wrap_outputs...", and TensorDictPrioritizedReplayBuffer cannot be built.
# PyPI has no torchrl sdist, but the wheel ships its own C++ sources (torchrl/csrc/), so this
# compiles exactly the installed version's code (CPU only: the CUDA segment trees need WITH_CUDA).
# The original .so is kept as _torchrl.*.so.pypi-orig. Needs g++; 2-3 minutes with 1 job.
set -euo pipefail
PY=${1:-python3}
SP=$("$PY" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torchrl").origin))')
SO=$(ls "$SP"/_torchrl.cpython-*.so 2>/dev/null | head -1)
if "$PY" -c 'import torchrl._torchrl' 2>/dev/null; then
    echo "torchrl._torchrl already loads with this torch; nothing to do"
    exit 0
fi
[ -d "$SP/csrc" ] || { echo "error: $SP/csrc not found: this torchrl wheel does not ship its C++ sources" >&2; exit 2; }
BUILD=$(mktemp -d /tmp/torchrl-ext.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
cp "$SP"/csrc/*.cpp "$SP"/csrc/*.h "$BUILD"/
cat > "$BUILD/setup.py" <<'EOF'
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(name="torchrl_ext_rebuild",
      ext_modules=[CppExtension(name="torchrl._torchrl", sources=["pybind.cpp", "utils.cpp"],
                                extra_compile_args=["-O3"])],
      cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)})
EOF
# only the files the extension is made of (the CUDA ones need nvcc)
rm -f "$BUILD"/cuda_*
(cd "$BUILD" && MAX_JOBS=${MAX_JOBS:-1} "$PY" setup.py build_ext --build-lib out > build.log 2>&1) || {
    echo "error: build failed; last lines of the log:" >&2; tail -20 "$BUILD/build.log" >&2; exit 1; }
NEW=$(ls "$BUILD"/out/torchrl/_torchrl.cpython-*.so)
strip --strip-debug "$NEW" 2>/dev/null || true
if [ -n "$SO" ] && [ ! -e "$SO.pypi-orig" ]; then mv "$SO" "$SO.pypi-orig"; fi
cp "$NEW" "$SP/"
"$PY" -c 'import torchrl._torchrl as t; assert hasattr(t, "SumSegmentTreeFp32"); print("torchrl._torchrl rebuilt:", t.__file__)'
