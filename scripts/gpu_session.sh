#!/usr/bin/env bash
# The GPU benches in one go on an air-gapped node with 2 GPUs (bench/gpu_*.py; docs/gpu.md):
#   1. install the wheelhouse (scripts/build_wheelhouse.sh) into /tmp/site, no network;
#   2. weight sync GPU0 -> GPU1 (both GPUs);
#   3. learner MFU on GPU0 and generation throughput on GPU1, side by side;
#   4. the whole loop (rlq train) with the learner on GPU0 and a transformers worker on GPU1.
# Results go to bench/results/gpu_*.json and $OUT (default ./gpu-out), with one session.log.
# Usage: OUT=/path WHEELS=.whl STAGES="sync learner generate loop" scripts/gpu_session.sh
# LEARNER_ARGS passes arguments to bench/gpu_learner.py, e.g. "--no-check --variants project:pack=8192,compile=1".
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# NVLink multicast off (it can take a shared host's GPUs down); PyTorch and NVSHMEM likewise.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OUT=${OUT:-$PWD/gpu-out}
wheels=${WHEELS:-.whl}
stages=${STAGES:-"sync learner generate loop"}
mkdir -p "$OUT"
log="$OUT/session.log"
exec > >(tee -a "$log") 2>&1

echo "== $(date -u +%FT%TZ) $(hostname) stages: $stages"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -5
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import torch, transformers, redis, celery, msgspec; print("torch", torch.__version__, "transformers",
transformers.__version__, "gpus", torch.cuda.device_count())' || exit 1
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')

has() { [[ " $stages " == *" $1 "* ]]; }
run() {  # run NAME TIMEOUT CMD...: one stage, its output prefixed, its exit status reported
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | sed -u "s/^/[$name] /"
  echo "== $name rc=${PIPESTATUS[0]} in $((SECONDS - t0))s"
}

if has sync && ((ngpu >= 2)); then
  run sync "${SYNC_TIMEOUT:-150}" python3 -m bench.gpu_weight_sync
fi
# Side by side on two GPUs; one after the other on one (the learner run fills a whole 80 GB card).
learner_pid=
if has learner; then
  read -ra learner_args <<<"${LEARNER_ARGS:-}"
  if ((ngpu >= 2)); then
    CUDA_VISIBLE_DEVICES=0 run learner "${LEARNER_TIMEOUT:-420}" python3 -m bench.gpu_learner "${learner_args[@]}" &
    learner_pid=$!
  else
    CUDA_VISIBLE_DEVICES=0 run learner "${LEARNER_TIMEOUT:-420}" python3 -m bench.gpu_learner "${learner_args[@]}"
  fi
fi
if has generate; then
  CUDA_VISIBLE_DEVICES=$((ngpu >= 2 ? 1 : 0)) run generate "${GENERATE_TIMEOUT:-280}" python3 -m bench.gpu_generate
fi
# Wait for that job only: a bare `wait` also waits for the `tee` of the log (bash >= 5.1), i.e. forever.
[[ -n $learner_pid ]] && wait "$learner_pid"
if has loop && ((ngpu >= 2)); then
  run loop "${LOOP_TIMEOUT:-200}" python3 -m bench.gpu_loop --timeout "$((${LOOP_TIMEOUT:-200} - 20))"
fi
echo "== done $(date -u +%FT%TZ)"
ls -la "$OUT"
