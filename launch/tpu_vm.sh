#!/usr/bin/env bash
# Runs nextaccel_jax on a Cloud TPU VM: creates the VM (or reuses it when `gcloud compute tpus
# tpu-vm describe` finds it), installs this project on every worker, then starts
# `python -m nextaccel_jax.main` on all workers at once.
#
# Usage (arguments are passed on to nextaccel_jax.main):
#   TPU_NAME=nextaccel ZONE=us-central2-b WORKDIR=/mnt/shared/runs/paper \
#     TFDS_DATA_DIR=/mnt/shared/tensorflow_datasets launch/tpu_vm.sh --config.student.num_epochs=100
#   DRY_RUN=1 TPU_NAME=nextaccel ZONE=us-central2-b WORKDIR=/mnt/runs launch/tpu_vm.sh
#
# The code sent is a `git archive` of this checkout's HEAD (uncommitted changes are not copied), or
# a clone of REPO_URL at REPO_REF. It replaces ~/nextaccel_jax on each worker at every launch; the
# venv is ~/nextaccel_jax_venv, with a Python installed by uv because the TPU images' system Python
# is older than the package needs, and jax[tpu] next to the package. On a multi-host slice (v4-16
# and larger) nextaccel_jax.main calls jax.distributed.initialize(), which finds the other workers
# by itself, so every worker runs the same command with no extra flags. The job is attached to the
# ssh sessions: if they drop, run the script again to resume (finished stages are skipped and
# checkpoints restored). A dry run prints the create command as if describe had found no VM.
#
# Environment variables:
#   TPU_NAME          required; the TPU VM to create or reuse
#   ZONE              required; its zone, e.g. us-central2-b
#   PROJECT           Google Cloud project, passed as --project (default: unset, gcloud's own)
#   ACCELERATOR_TYPE  slice type of a new VM (default v4-8)
#   RUNTIME_VERSION   TPU software version of a new VM (default tpu-ubuntu2204-base)
#   SPOT              1: create a Spot VM, with --spot (default 0)
#   CONFIG            config file[:preset], relative to the repository (default
#                     configs/pipeline.py:paper)
#   WORKDIR           required; absolute output path on the workers. On a multi-host slice every
#                     worker must see the same checkpoints, so use a folder shared by all of them
#                     at the same path (a Cloud Storage bucket mounted with gcsfuse, or a Filestore
#                     share). gs:// URLs are refused: the stages write their metrics and reports
#                     with ordinary file I/O, which would put them in a local folder named gs:.
#   TFDS_DATA_DIR     TFDS data dir, exported on the workers (default: unset, so the pipeline uses
#                     <WORKDIR>/tensorflow_datasets); every worker must be able to read it
#   REPO_URL          git URL cloned on the workers instead of copying this checkout (default:
#                     unset)
#   REPO_REF          branch, tag or commit of REPO_URL (default HEAD: its default branch)
#   PYTHON_VERSION    Python of the workers' venv (default 3.12)
#   TMPDIR            where the archive of this checkout is written before the copy (default /tmp)
#   DRY_RUN           1: print the commands instead of running them (default 0)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

script_name=tpu_vm.sh
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run="${DRY_RUN:-0}"
accelerator_type="${ACCELERATOR_TYPE:-v4-8}"
runtime_version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
config="${CONFIG:-configs/pipeline.py:paper}"
repo_ref="${REPO_REF:-HEAD}"
python_version="${PYTHON_VERSION:-3.12}"

[[ -n ${TPU_NAME:-} ]] || die "TPU_NAME is not set: the TPU VM to create or reuse"
[[ -n ${ZONE:-} ]] || die "ZONE is not set: the TPU VM's zone, e.g. us-central2-b"
[[ -n ${WORKDIR:-} ]] || die "WORKDIR is not set: an absolute output path on the workers"
if [[ $WORKDIR == gs://* ]]; then
  die "WORKDIR=$WORKDIR: gs:// is not supported; mount the bucket with gcsfuse and give its path"
fi
[[ $WORKDIR == /* ]] || die "WORKDIR=$WORKDIR must be an absolute path on the workers"

gcloud_flags=("--zone=$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  gcloud_flags+=("--project=$PROJECT")
fi
tpu=(gcloud compute tpus tpu-vm)

create=(
  "${tpu[@]}" create "$TPU_NAME" "${gcloud_flags[@]}" "--accelerator-type=$accelerator_type"
  "--version=$runtime_version"
)
if [[ ${SPOT:-0} != 0 ]]; then
  create+=(--spot)
fi
if [[ $dry_run != 0 ]]; then
  run "${tpu[@]}" describe "$TPU_NAME" "${gcloud_flags[@]}"
  run "${create[@]}"
elif "${tpu[@]}" describe "$TPU_NAME" "${gcloud_flags[@]}" >/dev/null 2>&1; then
  warn "reusing the existing TPU VM $TPU_NAME"
else
  run "${create[@]}"
fi

# Unpacked or cloned next to the old copy and swapped in, so a failed fetch leaves no half tree.
if [[ -n ${REPO_URL:-} ]]; then
  fetch="git clone -q $(quote "$REPO_URL") ~/nextaccel_jax.new"
  fetch+="; git -C ~/nextaccel_jax.new checkout -q $(quote "$repo_ref")"
else
  if [[ $dry_run == 0 ]]; then
    git -C "$repo_root" rev-parse --verify -q HEAD >/dev/null ||
      die "$repo_root is not a git checkout with a commit; set REPO_URL to clone one instead"
    if [[ -n $(git -C "$repo_root" status --porcelain --untracked-files=no) ]]; then
      warn "warning: uncommitted changes are not copied (git archive of HEAD)"
    fi
  fi
  tarball="${TMPDIR:-/tmp}/nextaccel_jax-$TPU_NAME.tar.gz"
  run rm -f "$tarball"
  run git -C "$repo_root" archive --format=tar.gz -o "$tarball" HEAD
  run "${tpu[@]}" scp "$tarball" "$TPU_NAME:nextaccel_jax.tar.gz" "${gcloud_flags[@]}" --worker=all
  run rm -f "$tarball"
  fetch="mkdir ~/nextaccel_jax.new; tar -xzf ~/nextaccel_jax.tar.gz -C ~/nextaccel_jax.new"
  fetch+="; rm ~/nextaccel_jax.tar.gz"
fi
# Each worker's shell expands the ~ paths.
install="set -euo pipefail; rm -rf ~/nextaccel_jax.new; $fetch"
install+="; rm -rf ~/nextaccel_jax; mv ~/nextaccel_jax.new ~/nextaccel_jax"
install+="; [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh"
install+=" | env UV_NO_MODIFY_PATH=1 sh"
install+="; [ -x ~/nextaccel_jax_venv/bin/python ]"
install+=" || ~/.local/bin/uv venv -q --python $(quote "$python_version") ~/nextaccel_jax_venv"
install+="; ~/.local/bin/uv pip install -q --python ~/nextaccel_jax_venv/bin/python"
install+=" -e ~/nextaccel_jax 'jax[tpu]'"
run "${tpu[@]}" ssh "$TPU_NAME" "${gcloud_flags[@]}" --worker=all "--command=$install"

job="cd ~/nextaccel_jax"
if [[ -n ${TFDS_DATA_DIR:-} ]]; then
  job+="; export TFDS_DATA_DIR=$(quote "$TFDS_DATA_DIR")"
fi
job+="; exec ~/nextaccel_jax_venv/bin/python -m nextaccel_jax.main"
job+=" $(quote "--config=$config" "--workdir=$WORKDIR" "$@")"
run "${tpu[@]}" ssh "$TPU_NAME" "${gcloud_flags[@]}" --worker=all "--command=$job"
