# shellcheck shell=bash
# Helpers shared by build_tfds.sh, local_cpu8.sh and tpu_vm.sh, which source this file from their
# own directory. slurm_gpu.sbatch keeps its own copies: sbatch runs a spooled copy of it, away from
# this folder.
#
# Environment variables are read by the scripts, never here, so that each script's header lists
# everything it reads. The sourcing script sets these globals first:
#   script_name  the script's file name, the prefix of its messages
#   dry_run      0 to run commands; anything else prints them instead
# Both are set by the caller, so shellcheck cannot see their assignments when it checks this file.
# shellcheck disable=SC2154

# A message to stderr, prefixed so it is clear which script printed it.
warn() {
  echo "$script_name: $*" >&2
}

# Status 2 tells a wrong setting apart from a failed command.
die() {
  warn "$@"
  exit 2
}

# Plain words as they are, anything else in single quotes, so a printed command can be pasted
# (and so values survive a remote shell).
quote() {
  local word sq="'\\''" out=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/$sq}'")
    fi
  done
  printf '%s' "${out[*]}"
}

# Relative paths are taken from the caller's directory, since the scripts run their commands from
# the repository.
absolute() {
  if [[ $1 == /* || $1 == *://* ]]; then
    printf '%s' "$1"
  else
    printf '%s/%s' "$PWD" "$1"
  fi
}

run() {
  if [[ $dry_run != 0 ]]; then
    printf '+ %s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

# interpreter REQUESTED REPO_ROOT: the repository's venv already has the package installed, so it
# is preferred to whatever python3 is on PATH unless the caller asked for one.
interpreter() {
  if [[ -n $1 ]]; then
    printf '%s' "$1"
  elif [[ -x $2/.venv/bin/python ]]; then
    printf '%s' "$2/.venv/bin/python"
  else
    printf '%s' python3
  fi
}
