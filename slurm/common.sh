#!/usr/bin/env bash
# Shared by the sbatch scripts: run directory, command log, and node lists. Source it; don't run it.
# With RLQ_DRY_RUN=1 every command is written to the run directory and printed, not executed
# (tests/integration/test_slurm.py renders the scripts that way).

: "${RLQ_CONFIG:?set RLQ_CONFIG to the run config, e.g. configs/grpo_dapo17k_qwen3_4b_instruct.yaml}"
RLQ_REPO=${RLQ_REPO:-$PWD}
RLQ_PYTHON=${RLQ_PYTHON:-$RLQ_REPO/.venv/bin/python}
RLQ_RUN=${RLQ_RUN:-${SLURM_JOB_NAME:-rlq}-${SLURM_JOB_ID:-local}}
RLQ_RUN_DIR=${RLQ_RUN_DIR:-$RLQ_REPO/runs/$RLQ_RUN}
RLQ_REDIS_PORT=${RLQ_REDIS_PORT:-6379}
RLQ_TORCH_PORT=${RLQ_TORCH_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
mkdir -p "$RLQ_RUN_DIR/logs"
COMMANDS_FILE="$RLQ_RUN_DIR/commands.sh"

# Record a command in the run directory (exactly as it will run), then run it unless this is a dry run.
# One write per line: roles start in the background, and their lines must not interleave.
run_logged() {
  local line
  line=$(printf '%q ' "$@")
  printf '%s\n' "$line" >>"$COMMANDS_FILE"
  if [ "${RLQ_DRY_RUN:-0}" = 1 ]; then
    printf '%s\n' "$line"
  else
    "$@"
  fi
}

# Expand a Slurm node list into one host name per line (scontrol when present, else the list as given).
expand_nodes() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1"
  else
    tr ',' '\n' <<<"$1"
  fi
}

# The broker URL every role uses: the head node's Redis. A password travels in RLQ_REDIS_PASSWORD (exported
# to every srun step), never in the URL, so commands.sh and the logs hold no secret.
broker_url() {
  printf 'redis://%s:%s/0' "$1" "$RLQ_REDIS_PORT"
}
