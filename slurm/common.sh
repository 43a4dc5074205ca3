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

# Record a command in the run directory (exactly as it will run); in a dry run, print it too.
log_command() {
  local line
  line=$(printf '%q ' "$@")
  printf '%s\n' "$line" >>"$COMMANDS_FILE"
  if [ "${RLQ_DRY_RUN:-0}" = 1 ]; then
    printf '%s\n' "$line"
  fi
}

# Record a command, then run it in the foreground unless this is a dry run.
run_logged() {
  log_command "$@"
  if [ "${RLQ_DRY_RUN:-0}" != 1 ]; then
    "$@"
  fi
}

# Background roles, started from this shell (not a subshell), so the pids kept are the processes' own.
STEP_PIDS=()   # srun of a role on the allocation's nodes
LOCAL_PIDS=()  # a process on the batch host itself (the head node)

# start_step CMD...: record an srun command and run it in the background (unless this is a dry run).
start_step() {
  log_command "$@"
  if [ "${RLQ_DRY_RUN:-0}" != 1 ]; then
    "$@" &
    STEP_PIDS+=("$!")
  fi
}

# start_local LOG CMD...: record a command and run it in the background on the batch host, output to LOG.
start_local() {
  local output=$1
  shift
  log_command "$@"
  if [ "${RLQ_DRY_RUN:-0}" != 1 ]; then
    "$@" >>"$output" 2>&1 &
    LOCAL_PIDS+=("$!")
  fi
}

# Stop the background roles once the learner has exited, the broker last (workers release their batches through
# it). Slurm delivers a step's SIGTERM to every process of the step at once (srun itself would turn one into
# SIGKILL); the broker and `rlq track` run on the batch host instead, so each gets its SIGTERM alone and stops in
# order (redis saves, W&B flushes, the curves are drawn). Anything left after RLQ_STOP_TIMEOUT_S is killed.
stop_roles() {
  if [ "${RLQ_DRY_RUN:-0}" = 1 ]; then
    return 0
  fi
  if [ "${#STEP_PIDS[@]}" -gt 0 ]; then
    scancel --signal=TERM "${SLURM_JOB_ID:?}" || true
    wait_or_kill "${STEP_PIDS[@]}"
  fi
  if [ "${#LOCAL_PIDS[@]}" -gt 0 ]; then
    kill -TERM "${LOCAL_PIDS[@]}" 2>/dev/null || true
    wait_or_kill "${LOCAL_PIDS[@]}"
  fi
}

# wait_or_kill PID...: wait for background processes of this shell, killing those left after the timeout.
wait_or_kill() {
  local pid deadline=$((SECONDS + ${RLQ_STOP_TIMEOUT_S:-60}))
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
      sleep 1
    done
  done
  kill -KILL "$@" 2>/dev/null || true
  wait "$@" 2>/dev/null || true
}

# Expand a Slurm node list into one host name per line (scontrol when it answers, else the list as given).
expand_nodes() {
  scontrol show hostnames "$1" 2>/dev/null || tr ',' '\n' <<<"$1"
}

# The address other nodes reach node $1 at: its NodeAddr in Slurm (often the name itself, but not always: the
# local test cluster's nodes are aliases of 127.0.0.1), else the name.
node_addr() {
  local addr
  addr=$(scontrol show node -o "$1" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p') || true
  printf '%s\n' "${addr:-$1}"
}

# The run secret (docs/security.md): RLQ_REDIS_SECRET, or RLQ_REDIS_PASSWORD (its older name), or one made here for
# this run; kept in $RLQ_RUN_DIR/broker_secret (0600), where `rlq queues|workers|top --config` and
# add_generation_workers.sh find it. It is not exported: `rlq broker-server` alone gets it (with_secret), every
# role gets only its own user's password (with_user), and no command line or log holds either.
load_secret() {
  local file="$RLQ_RUN_DIR/broker_secret"
  RUN_SECRET=${RLQ_REDIS_SECRET:-${RLQ_REDIS_PASSWORD:-}}
  unset RLQ_REDIS_SECRET RLQ_REDIS_PASSWORD
  if [ -z "$RUN_SECRET" ] && [ -s "$file" ]; then
    RUN_SECRET=$(<"$file")  # a resubmitted run keeps its secret
  fi
  if [ -z "$RUN_SECRET" ]; then
    RUN_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
  fi
  (umask 077 && printf '%s\n' "$RUN_SECRET" >"$file")
}

# user_password USER: USER's password, derived from the secret as broker/acl.py password_for does (HMAC-SHA256);
# the secret goes in on stdin, never on a command line. A dry run's RLQ_PYTHON need not exist: python3 then.
user_password() {
  local python=$RLQ_PYTHON
  [ -x "$python" ] || python=python3
  printf '%s' "$RUN_SECRET" | "$python" -c 'import hashlib, hmac, sys
print(hmac.new(sys.stdin.buffer.read(), sys.argv[1].encode(), hashlib.sha256).hexdigest())' "$1"
}

# with_user USER CMD...: run CMD (start_step, run_logged, ...) with USER's login in its environment only; the
# learner and the generation workers also get the weight group's token (learner/broadcast.py).
with_user() {
  local user=$1 password token=""
  shift
  password=$(user_password "$user")
  if [ "$user" = rlq-generate ] || [ "$user" = rlq-learner ]; then
    token=$(user_password rlq-weight-group)
  fi
  RLQ_REDIS_USER=$user RLQ_REDIS_PASSWORD=$password RLQ_WEIGHT_TOKEN=$token "$@"
}

# with_secret CMD...: run CMD with the run secret in its environment (the broker server derives its users' hashes).
with_secret() {
  RLQ_REDIS_SECRET=$RUN_SECRET "$@"
}

# With RLQ_REDIS_TLS=1 the broker serves rediss:// only. make_tls HOST makes a CA for this run and a server
# certificate for HOST in $RLQ_RUN_DIR/tls (0700), then deletes the CA's key: nobody can sign another certificate
# this run's clients would trust. Every role verifies the server against the CA (RLQ_REDIS_TLS_CA, exported).
make_tls() {
  local dir="$RLQ_RUN_DIR/tls" host=$1 san
  mkdir -p "$dir" && chmod 700 "$dir"
  if [[ $host =~ ^[0-9.]+$ ]]; then san="IP:$host"; else san="DNS:$host"; fi
  if [ ! -s "$dir/server.crt" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=rlq-$RLQ_RUN-ca" \
      -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$host" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 30 \
      -extfile <(printf 'subjectAltName=%s,IP:127.0.0.1\n' "$san") -out "$dir/server.crt" 2>/dev/null
    rm -f "$dir/ca.key" "$dir/server.csr" "$dir/ca.srl"
  fi
  export RLQ_REDIS_TLS_CA="$dir/ca.crt"
}

# The broker URL every role uses: the head node's Redis (rediss:// with RLQ_REDIS_TLS=1). Credentials travel in
# the environment (with_user), never in the URL, so commands.sh and the logs hold no secret.
broker_url() {
  local scheme=redis
  [ "${RLQ_REDIS_TLS:-0}" = 1 ] && scheme=rediss
  printf '%s://%s:%s/0' "$scheme" "$1" "$RLQ_REDIS_PORT"
}
