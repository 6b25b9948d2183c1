#!/usr/bin/env bash
# Runs nextaccel_jax on eight simulated CPU devices on this machine: the same device count as the
# tests, so sharded code paths (and, with NUM_PROCESSES > 1, the multi-process ones) can be tried
# without accelerators. Needs bash >= 4.4 (macOS: `brew install bash`).
#
# Usage (arguments are passed on to nextaccel_jax.main):
#   launch/local_cpu8.sh
#   CONFIG=configs/aqvae.py:smoke WORKDIR=runs/aqvae_cpu8 launch/local_cpu8.sh --config.seed=1
#   NUM_PROCESSES=2 launch/local_cpu8.sh   # two processes on 127.0.0.1 with four devices each
#   DRY_RUN=1 NUM_PROCESSES=4 launch/local_cpu8.sh
#
# With NUM_PROCESSES=N each process gets 8/N devices and `--coordinator_address=127.0.0.1:PORT
# --num_processes=N --process_id=i`; the script waits for all of them and, as soon as one fails,
# stops the others (they would otherwise wait for it at the next collective) and exits with the
# failed process's status.
#
# Environment variables:
#   CONFIG          config file[:preset], relative to the repository root (default
#                   configs/demo.py:smoke)
#   WORKDIR         output folder, relative to the current directory (default runs/local_cpu8 in
#                   the repository)
#   NUM_PROCESSES   processes to start, a divisor of 8 (default 1)
#   PORT            coordinator port on 127.0.0.1 when NUM_PROCESSES > 1 (default 12355)
#   PYTHON          interpreter (default: the repository's .venv/bin/python if it exists, else
#                   python3)
#   XLA_FLAGS       extra XLA flags, kept; any --xla_force_host_platform_device_count in it is
#                   replaced (default: empty)
#   DRY_RUN         1: print the commands instead of running them (default 0)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

script_name=local_cpu8.sh
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="${CONFIG:-configs/demo.py:smoke}"
workdir="${WORKDIR:-$repo_root/runs/local_cpu8}"
num_processes="${NUM_PROCESSES:-1}"
port="${PORT:-12355}"
dry_run="${DRY_RUN:-0}"
python="$(interpreter "${PYTHON:-}" "$repo_root")"

case "$num_processes" in
  1 | 2 | 4 | 8) ;;
  *) die "NUM_PROCESSES=$num_processes must divide 8 (1, 2, 4 or 8)" ;;
esac
[[ $port =~ ^[0-9]+$ ]] || die "PORT=$port is not a port number"
devices=$((8 / num_processes))

xla_flags=()
read -ra words <<<"${XLA_FLAGS:-}"
for word in "${words[@]}"; do
  [[ $word == --xla_force_host_platform_device_count=* ]] || xla_flags+=("$word")
done
xla_flags+=("--xla_force_host_platform_device_count=$devices")

command=(
  env "XLA_FLAGS=${xla_flags[*]}" JAX_PLATFORMS=cpu
  "$python" -m nextaccel_jax.main "--config=$config" "--workdir=$(absolute "$workdir")" "$@"
)

# configs/*.py import each other as `configs.*`, which resolves from the repository root.
run cd "$repo_root"

if ((num_processes == 1)); then
  run "${command[@]}"
  exit 0
fi

pids=()
stop_all() {
  if ((${#pids[@]})); then
    kill "${pids[@]}" 2>/dev/null || true
  fi
}
# Background processes of a script ignore Ctrl-C, so it is passed on to them explicitly.
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for ((i = 0; i < num_processes; i++)); do
  process=(
    "${command[@]}" "--coordinator_address=127.0.0.1:$port"
    "--num_processes=$num_processes" "--process_id=$i"
  )
  if [[ $dry_run != 0 ]]; then
    printf '+ %s &\n' "$(quote "${process[@]}")"
  else
    "${process[@]}" &
    pids+=("$!")
  fi
done
if [[ $dry_run != 0 ]]; then
  echo "+ wait"
  exit 0
fi

for ((i = 0; i < num_processes; i++)); do
  status=0
  wait -n || status=$?
  if ((status != 0)); then
    warn "a process exited with status $status; stopping the others"
    stop_all
    wait || true
    exit "$status"
  fi
done
