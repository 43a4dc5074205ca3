#!/usr/bin/env bash
# A private one-machine Slurm cluster for trying the sbatch scripts for real (tests/integration/test_slurm_cluster.py).
#
#   scripts/slurm_local_cluster.sh start [DIR]   install Debian's slurmd/slurmctld/munge if missing, write a config
#                                                under DIR, start munged, slurmctld and one slurmd per node alias,
#                                                wait until sinfo shows every node idle (idempotent)
#   scripts/slurm_local_cluster.sh stop [DIR]    stop the daemons this script started (by their pid files)
#   scripts/slurm_local_cluster.sh env [DIR]     print `export SLURM_CONF=...` for the clients (sbatch, sinfo, srun)
#
# Exit status 3: Slurm is not installed and apt-get could not install it (the tests skip then).
# DIR defaults to $RLQ_SLURM_DIR or /tmp/rlq-slurm. Nothing outside DIR is written (a system /etc/slurm stays as it
# is): the daemons and the clients read DIR/etc/slurm.conf through SLURM_CONF, and munged runs on its own socket
# and key in DIR. Everything listens on 127.0.0.1 only; munge (a key readable by root alone) authenticates.
#
# RLQ_SLURM_NODES (default 3: the hetjob has three components) slurmd daemons run on this host under the aliases rlq-n0, rlq-n1, ..., each on its
# own port, so the multi-node and heterogeneous scripts get several "nodes". Every node declares the host's real
# CPU count (each slurmd sees all of them) and gpu:8 as a count-only GRES with no device behind it, so the
# scripts' GPU requests (--gres=gpu:8, --gpus-per-task=1) are scheduled exactly as written.
set -euo pipefail

action=${1:-start}
dir=$(realpath -m "${2:-${RLQ_SLURM_DIR:-/tmp/rlq-slurm}}")
node_count=${RLQ_SLURM_NODES:-3}
ctld_port=${RLQ_SLURM_PORT:-16817}  # slurmd n listens on ctld_port + 1 + n
fake_gpus=${RLQ_SLURM_GPUS:-8}
conf="$dir/etc/slurm.conf"
export SLURM_CONF=$conf

nodes() {
  local i
  for ((i = 0; i < node_count; i++)); do printf 'rlq-n%d\n' "$i"; done
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { echo "Slurm is not installed and this is not root: apt-get install slurmd slurmctld slurm-client munge" >&2; exit 3; }
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d keeps the packages' own services (the system munge and slurm) from starting.
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmd slurmctld slurm-client munge \
      >/dev/null; }; then
    echo "apt-get could not install slurmd slurmctld slurm-client munge" >&2
    exit 3
  fi
}

write_config() {
  mkdir -p "$dir"/{etc,run,log,spool/ctld} && chmod 700 "$dir"
  if [ ! -s "$dir/etc/munge.key" ]; then
    (umask 077 && head -c 1024 /dev/urandom >"$dir/etc/munge.key")
  fi
  local cpus memory gres_types="" node_gres="" i
  cpus=$(nproc --all)
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # MiB; half, so slurmd never reports less
  if [ "$fake_gpus" -gt 0 ]; then
    gres_types="GresTypes=gpu"
    node_gres="Gres=gpu:$fake_gpus"
    # Slurm drops a GPU without a device file; /dev/null stands in (task/none: nothing is bound to it).
    mkdir -p "$dir/dev"
    for ((i = 0; i < fake_gpus; i++)); do ln -sfn /dev/null "$dir/dev/gpu$i"; done
    printf 'Name=gpu File=%s/dev/gpu[0-%d]\n' "$dir" "$((fake_gpus - 1))" >"$dir/etc/gres.conf"
  fi
  # proctrack/pgid and task/none: no cgroups (containers rarely delegate them); no accounting daemon. Not
  # proctrack/linuxproc: it parses /proc/PID/stat with a scanf that a process name with spaces defeats (Celery's
  # "[celeryd: judge..." title), so the judges were neither signalled nor killed and the nodes drained.
  cat >"$conf" <<EOF
# Written by scripts/slurm_local_cluster.sh: a private one-machine cluster; edit the script, not this file.
ClusterName=rlqlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/run/munge.socket
CredType=cred/munge
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d-%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=60
KillWait=10
$gres_types
EOF
  local node i=0
  while read -r node; do
    printf 'NodeName=%s NodeHostname=localhost NodeAddr=127.0.0.1 Port=%d CPUs=%d RealMemory=%d %s State=UNKNOWN\n' \
      "$node" "$((ctld_port + 1 + i))" "$cpus" "$memory" "$node_gres" >>"$conf"
    mkdir -p "$dir/spool/d-$node"
    i=$((i + 1))
  done < <(nodes)
  printf 'PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n' >>"$conf"
  printf 'CgroupPlugin=autodetect\nIgnoreSystemd=yes\n' >"$dir/etc/cgroup.conf"
}

alive() {  # alive PIDFILE: the process named in it still runs
  local pid
  pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

start_daemons() {
  if ! alive "$dir/run/munged.pid"; then
    munged --force --socket="$dir/run/munge.socket" --key-file="$dir/etc/munge.key" \
      --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/run/munged.seed"
  fi
  # -c: a fresh controller forgets earlier jobs and node states (a node drained by an old config stays drained).
  alive "$dir/run/slurmctld.pid" || slurmctld -c -f "$conf"
  local node
  while read -r node; do
    alive "$dir/run/slurmd-$node.pid" || slurmd -f "$conf" -N "$node"
  done < <(nodes)
}

wait_idle() {
  local deadline=$((SECONDS + ${RLQ_SLURM_START_TIMEOUT:-60})) states
  while [ "$SECONDS" -lt "$deadline" ]; do
    states=$(sinfo --noheader --node="$(nodes | paste -sd,)" -N -o '%N %t' 2>/dev/null || true)
    if [ "$(grep -c ' idle$' <<<"$states")" -eq "$node_count" ]; then
      printf '%s\n' "$states"
      return 0
    fi
    sleep 1
  done
  echo "the local Slurm cluster did not come up within ${RLQ_SLURM_START_TIMEOUT:-60}s; sinfo says:" >&2
  printf '%s\n' "${states:-nothing}" >&2
  tail -n 20 "$dir"/log/*.log >&2 || true
  exit 1
}

stop_daemons() {
  local pidfile pids=() deadline=$((SECONDS + 30))
  for pidfile in "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid" "$dir/run/munged.pid"; do
    [ -s "$pidfile" ] && pids+=("$(<"$pidfile")")
  done
  [ "${#pids[@]}" -eq 0 ] || kill "${pids[@]}" 2>/dev/null || true
  while [ "${#pids[@]}" -gt 0 ] && kill -0 "${pids[@]}" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
    sleep 0.2
  done
  rm -f "$dir"/run/*.pid
}

case "$action" in
  start)
    install_packages
    write_config
    start_daemons
    wait_idle
    ;;
  stop) stop_daemons ;;
  env) printf 'export SLURM_CONF=%q\n' "$conf" ;;
  *)
    echo "usage: scripts/slurm_local_cluster.sh start|stop|env [DIR]" >&2
    exit 2
    ;;
esac
