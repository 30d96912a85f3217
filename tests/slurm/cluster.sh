#!/usr/bin/env bash
# A throw-away one-node SLURM cluster (munged + slurmctld + slurmd, as root, no systemd) for the tests.
#
#   tests/slurm/cluster.sh start DIR   # write DIR/slurm.conf, start the daemons, wait for an idle node
#   tests/slurm/cluster.sh stop DIR    # stop the daemons started in DIR (by their pid files)
#
# `stop` first cancels the cluster's jobs (waiting up to 15 s for them to end).
# Needs root and Debian's packages `slurmctld slurmd slurm-client munge` (SLURM 22.05). `start` prints
# `SLURM_CONF=DIR/slurm.conf` as its last line: export it (and put tests/slurm/bin first on PATH for `sacct`)
# before using sbatch/squeue/scontrol. On failure `start` prints the reason and the daemons' logs on stderr,
# stops what it started, and exits 1. Everything (keys, sockets, state, logs) stays under DIR.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
PATH="$PATH:/usr/sbin:/usr/local/sbin:/sbin" # the daemons live there
START_TIMEOUT_S="${START_TIMEOUT_S:-30}"

die() {
  echo "slurm cluster: $*" >&2
  exit 1
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Stop the daemons whose pids are in the given pid files: SIGTERM to all at once (each takes ~2 s), SIGKILL to any
# left after 10 s. Never by name.
stop_pidfiles() {
  local pidfile pid pids=() i alive
  for pidfile in "$@"; do
    [ -s "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    fi
    rm -f "$pidfile"
  done
  for i in $(seq 100); do
    alive=0
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
}

# Cancel every job of this (private) cluster and wait for their processes to end: slurmstepd and the job's
# tasks outlive slurmd otherwise.
cancel_jobs() {
  local dir="$1" ids i
  [ -s "$dir/slurmctld.pid" ] && [ -f "$dir/slurm.conf" ] || return 0
  export SLURM_CONF="$dir/slurm.conf"
  ids="$(squeue -h -t PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING -o %i 2>/dev/null || true)"
  [ -n "$ids" ] || return 0
  # shellcheck disable=SC2086
  scancel $ids 2>/dev/null || true
  for i in $(seq 150); do
    [ -z "$(squeue -h -t RUNNING,COMPLETING,CONFIGURING,SUSPENDED -o %i 2>/dev/null || true)" ] && return 0
    sleep 0.1
  done
  echo "slurm cluster: jobs still running after scancel: $(squeue -h -o '%i %T' 2>/dev/null | tr '\n' ' ')" >&2
}

stop_cluster() {
  local dir="$1"
  cancel_jobs "$dir"
  stop_pidfiles "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"
}

show_logs() {
  local dir="$1" f
  for f in "$dir"/log/*.log; do
    [ -f "$f" ] || continue
    echo "---- $f (last 20 lines)" >&2
    tail -n 20 "$f" >&2
  done
}

start_cluster() {
  local dir="$1"
  [ "$(id -u)" = 0 ] || die "needs root (slurmd runs as root)"
  for cmd in munged mungekey slurmctld slurmd sbatch srun squeue scontrol sinfo python3; do
    command -v "$cmd" >/dev/null || die "$cmd not found (apt-get install slurmctld slurmd slurm-client munge)"
  done
  mkdir -p "$dir"/{munge,state,spool,log}
  dir="$(cd "$dir" && pwd)"
  chmod 755 "$dir" "$dir/munge" # munged refuses a socket folder that others cannot read

  # munge: a fresh key and a private socket
  mungekey -c -f -k "$dir/munge/munge.key" >/dev/null 2>&1 || die "mungekey failed"
  chmod 600 "$dir/munge/munge.key"
  munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed" --force >/dev/null 2>&1 || {
    show_logs "$dir"
    die "munged did not start"
  }

  # slurm.conf from the template: this machine's node line, fresh ports
  local node host
  node="$(slurmd -C | grep '^NodeName=')" || die "slurmd -C failed"
  host="${node#NodeName=}"
  host="${host%% *}"
  sed -e "s|@DIR@|$dir|g" -e "s|@HOST@|$host|g" -e "s|@NODE@|$node|g" \
    -e "s|@CTLD_PORT@|$(free_port)|g" -e "s|@SLURMD_PORT@|$(free_port)|g" \
    "$HERE/slurm.conf.in" >"$dir/slurm.conf"
  export SLURM_CONF="$dir/slurm.conf"

  slurmctld -f "$SLURM_CONF" -i >/dev/null 2>&1 || {
    show_logs "$dir"
    stop_cluster "$dir"
    die "slurmctld did not start"
  }
  slurmd -f "$SLURM_CONF" >/dev/null 2>&1 || {
    show_logs "$dir"
    stop_cluster "$dir"
    die "slurmd did not start"
  }

  # wait for an idle node
  local deadline=$((SECONDS + START_TIMEOUT_S)) state=""
  while ((SECONDS < deadline)); do
    state="$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)"
    [ "$state" = idle ] && break
    sleep 0.2
  done
  if [ "$state" != idle ]; then
    show_logs "$dir"
    stop_cluster "$dir"
    die "the node is not idle after ${START_TIMEOUT_S} s (state: ${state:-unknown})"
  fi
  echo "SLURM_CONF=$SLURM_CONF"
}

case "${1:-}" in
  start)
    [ -n "${2:-}" ] || die "usage: $0 start DIR"
    start_cluster "$2"
    ;;
  stop)
    [ -n "${2:-}" ] || die "usage: $0 stop DIR"
    stop_cluster "$2"
    ;;
  *)
    echo "usage: $0 start DIR | stop DIR" >&2
    exit 2
    ;;
esac
