#!/usr/bin/env bash
# Adds generation workers to a running rlq job: they register, load the latest checkpoint and are admitted
# to the weight group at the learner's next epoch.
# Usage: slurm/add_generation_workers.sh RUN_DIR [NODES] [extra sbatch args...]
set -euo pipefail
run_dir=${1:?usage: slurm/add_generation_workers.sh RUN_DIR [NODES] [sbatch args...]}
nodes=${2:-1}
shift $(( $# >= 2 ? 2 : 1 ))
if [ ! -f "$run_dir/broker_url" ] || [ ! -f "$run_dir/config_path" ]; then
  echo "$run_dir is not the directory of a running multi-node rlq job (no broker_url/config_path in it)" >&2
  exit 2
fi
RLQ_REPO=${RLQ_REPO:-$PWD}
RLQ_PYTHON=${RLQ_PYTHON:-$RLQ_REPO/.venv/bin/python}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
broker=$(<"$run_dir/broker_url")
config=$(<"$run_dir/config_path")
run=$(basename "$run_dir")
# The job's own role arguments (its overrides included) when it saved them, else the config and broker alone.
role_args="--config $config run_name=$run broker.url=$broker"
if [ -f "$run_dir/role_args" ]; then
  role_args=$(<"$run_dir/role_args")
fi
# The workers log in as rlq-generate (docs/security.md): its password derives from the job's secret (0600, ours),
# as broker/acl.py password_for does, and reaches the job in the environment, never on a command line.
derive() {
  python3 -c 'import hashlib, hmac, sys
print(hmac.new(sys.stdin.buffer.read().strip(), sys.argv[1].encode(), hashlib.sha256).hexdigest())' \
    "$1" <"$run_dir/broker_secret"
}
if [ -r "$run_dir/broker_secret" ]; then
  RLQ_REDIS_USER=rlq-generate
  RLQ_REDIS_PASSWORD=$(derive "$RLQ_REDIS_USER")
  RLQ_WEIGHT_TOKEN=$(derive rlq-weight-group)  # the weight group's token (learner/broadcast.py)
  export RLQ_REDIS_USER RLQ_REDIS_PASSWORD RLQ_WEIGHT_TOKEN
  unset RLQ_REDIS_SECRET
fi
if [ -f "$run_dir/tls/ca.crt" ]; then
  export RLQ_REDIS_TLS_CA="$run_dir/tls/ca.crt"
fi
command=(sbatch --job-name="$run-gen" --nodes="$nodes" --exclusive --gres="gpu:$GPUS_PER_NODE"
  --output="$run_dir/logs/added-%j.out" "$@"
  --wrap "srun --ntasks-per-node=$GPUS_PER_NODE --gpus-per-task=1 $RLQ_PYTHON -m rlq worker generate $role_args")
printf '%q ' "${command[@]}" >>"$run_dir/commands.sh"
printf '\n' >>"$run_dir/commands.sh"
if [ "${RLQ_DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${command[@]}"
  printf '\n'
else
  "${command[@]}"
fi
