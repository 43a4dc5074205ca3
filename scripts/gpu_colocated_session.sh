#!/usr/bin/env bash
# The tutorial's job on one GPU node, colocated, as a user types it (issue: the GPU node), then its figures:
#   1. rlq's runtime wheels (scripts/build_wheelhouse.sh) into /tmp/rlqsite, after the vLLM kit on PYTHONPATH;
#   2. a Qwen3-4B-shaped model with random bf16 weights under its hub id in an HF cache (HF_HUB_OFFLINE=1), and
#      a DAPO-schema JSONL, prepared with `rlq prepare-data --source dapo` (bench/gpu_colocated.py prepare);
#   3. the worker's engine alone (the throughput baseline), then `rlq train` with the tutorial's sanity overrides,
#      learner + vLLM worker colocated on GPU 0, a Celery judge on the CPUs; nvidia-smi sampled all along;
#   4. bench/results/gpu_colocated.json from the run; `rlq doctor` when DOCTOR=1.
# Usage (from the repo root): OUT=/path STEPS=3 scripts/gpu_colocated_session.sh [extra rlq train overrides]
# CPU_CHECK=1 runs the same steps on a CPU machine with a 2-layer float32 model (it checks the script, not speed).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export OUT=${OUT:-$PWD/gpu-out} HF_HOME=${HF_HOME:-/tmp/rlq-hf} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT" "$HF_HOME"
python=${PYTHON:-python3}
if [ "${CPU_CHECK:-0}" != 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rlqsite \
    .whl/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}:/tmp/rlqsite  # the kit's /tmp/site stays first
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
steps=${STEPS:-3}
run=${RUN_NAME:-gpu-colocated}
config=configs/grpo_dapo17k_qwen3_4b_instruct.yaml
# The tutorial's single-node sanity overrides, as its command line gives them.
tutorial=(logger.wandb.project=rlq-gpu logger.wandb.name="$run" "logger.log_dir=results/$run" grpo.val_at_start=false
          ++grpo.num_prompts_per_step=4 "++grpo.max_num_steps=$steps" ++policy.dtensor_cfg.clear_cache_every_n_steps=1
          ++cluster.num_nodes=1 "checkpointing.checkpoint_dir=results/$run/checkpoints")
# This node: one GPU (learner + one colocated worker), the prepared local data, no W&B; 1024-token completions
# keep a step near 10 s; bf16 master weights leave room beside vLLM (docs/gpu.md); random weights give zero
# rewards, so every sample trains (bench/gpu_colocated.py says why).
node=(run_name="$run" data.path=data/dapo17k-local cluster.learner_procs_per_node=1 cluster.generation_workers=1
      cluster.judge_workers=8 logger.wandb_enabled=false policy.generation.max_new_tokens=1024
      policy.master_weights=bfloat16 policy.skip_zero_advantage=false checkpointing.save_period=1000)
prepare=()
if [ "${CPU_CHECK:-0}" = 1 ]; then
  prepare=(--tiny --problems 200)
  node+=(policy.precision=float32 policy.master_weights=float32 policy.generation.vllm_cfg.precision=float32
         policy.generation.vllm_cfg.max_model_len=2048 policy.max_total_sequence_length=2048
         policy.generation.max_new_tokens=16 cluster.judge_workers=1 grpo.num_generations_per_prompt=4)
fi
stage() {  # stage NAME CMD...: one step, its output prefixed and kept in $OUT/session.log
  local name=$1 t0=$SECONDS
  shift
  "$@" 2>&1 | sed -u "s/^/[$name] /" | tee -a "$OUT/session.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/session.log"
  return "$rc"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$OUT/session.log"
if [ "${GPU_TESTS:-0}" = 1 ]; then
  stage gpu-tests "$python" -m pytest tests/gpu -q -p no:cacheprovider
fi
stage prepare "$python" -m bench.gpu_colocated prepare --hub-cache "$HF_HOME/hub" --scratch "$HF_HOME" \
  --data data/dapo-local.jsonl "${prepare[@]}" || exit 1
stage data "$python" -m rlq prepare-data --source dapo --input data/dapo-local.jsonl --output-dir data/dapo17k-local \
  || exit 1
smi_pid=
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 100 \
    >"$OUT/smi.csv" &
  smi_pid=$!
fi
if [ "${ALONE:-1}" = 1 ]; then
  stage alone "$python" -m bench.gpu_colocated alone --config "$config" --out "$OUT/engine_alone.json" \
    "${tutorial[@]}" "${node[@]}" "$@"
fi
stage train "$python" -m rlq train --config "$config" "${tutorial[@]}" "${node[@]}" "$@"
train_rc=$?
[ -n "$smi_pid" ] && kill "$smi_pid"
cp -r "results/$run/logs" "$OUT/logs" 2>/dev/null
cp "results/$run/metrics.jsonl" "$OUT/" 2>/dev/null
if [ "$train_rc" = 0 ] && [ "${CPU_CHECK:-0}" != 1 ]; then
  stage report "$python" -m bench.gpu_colocated report --run-dir "results/$run" --smi "$OUT/smi.csv" \
    --alone "$OUT/engine_alone.json" --note "${NOTE:-}"
  cp bench/results/gpu_colocated.json "$OUT/" 2>/dev/null
elif [ "$train_rc" = 0 ]; then
  stage report "$python" -m bench.gpu_colocated report --run-dir "results/$run" --note cpu-check \
    --alone "$OUT/engine_alone.json" --smi "$OUT/smi.csv" --out-name gpu_colocated_cpucheck
  mv bench/results/gpu_colocated_cpucheck.json "$OUT/"
fi
if [ "${DOCTOR:-0}" = 1 ]; then
  stage doctor "$python" -m rlq doctor --config "$config" "${tutorial[@]}" "${node[@]}" "$@"
fi
exit "$train_rc"
