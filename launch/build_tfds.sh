#!/usr/bin/env bash
# Builds the `fastmri_brain_multiscale` TFDS dataset into TFDS_DATA_DIR with
# `python -m nextaccel_jax.data.build`; the training configs read it from there. Building resumes
# where it stopped when run again.
#
# Usage:
#   FASTMRI_DIR=/data/fastmri_brain TFDS_DATA_DIR=/data/tensorflow_datasets launch/build_tfds.sh
#   BUILDER_CONFIG=demo TFDS_DATA_DIR=/data/tensorflow_datasets launch/build_tfds.sh
#   DRY_RUN=1 FASTMRI_DIR=/data/fastmri_brain TFDS_DATA_DIR=/tmp/tfds launch/build_tfds.sh
#
# The `fastmri` config reads the real fastMRI brain multicoil data (request access at
# https://fastmri.med.nyu.edu/ and extract the archives into one folder holding multicoil_train/
# and multicoil_val/, optionally multicoil_test_full/). The synthetic `demo` and `smoke` configs
# generate their volumes and need no FASTMRI_DIR.
#
# Environment variables:
#   TFDS_DATA_DIR    required; TFDS data dir to build into (relative: to the current directory)
#   BUILDER_CONFIG   fastmri, demo or smoke (default fastmri)
#   FASTMRI_DIR      required for fastmri; the folder holding multicoil_train/ and multicoil_val/
#   NUM_WORKERS      preprocessing processes (default: the number of CPUs, from nproc)
#   PYTHON           interpreter (default: the repository's .venv/bin/python if it exists, else
#                    python3)
#   DRY_RUN          1: print the command instead of running it (default 0)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

script_name=build_tfds.sh
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
builder_config="${BUILDER_CONFIG:-fastmri}"
dry_run="${DRY_RUN:-0}"
python="$(interpreter "${PYTHON:-}" "$repo_root")"

[[ -n ${TFDS_DATA_DIR:-} ]] || die "TFDS_DATA_DIR is not set: the TFDS data dir to build into"
if [[ -n ${NUM_WORKERS:-} ]]; then
  num_workers="$NUM_WORKERS"
else
  # nproc is GNU coreutils; getconf also works on macOS.
  num_workers="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"
fi
[[ $num_workers =~ ^[1-9][0-9]*$ ]] || die "NUM_WORKERS=$num_workers is not a positive integer"

command=(
  "$python" -m nextaccel_jax.data.build "--config=$builder_config"
  "--data_dir=$(absolute "$TFDS_DATA_DIR")" "--num_workers=$num_workers"
)
if [[ $builder_config == fastmri ]]; then
  get="fastMRI access: https://fastmri.med.nyu.edu/"
  [[ -n ${FASTMRI_DIR:-} ]] ||
    die "FASTMRI_DIR is not set: the folder with multicoil_train/ and multicoil_val/ ($get)"
  [[ -d $FASTMRI_DIR ]] || die "FASTMRI_DIR=$FASTMRI_DIR is not a directory ($get)"
  for split in multicoil_train multicoil_val; do
    [[ -d $FASTMRI_DIR/$split ]] ||
      die "FASTMRI_DIR=$FASTMRI_DIR has no $split/ (extract the brain multicoil archives; $get)"
  done
  command+=("--manual_dir=$(absolute "$FASTMRI_DIR")")
fi

# The builder module resolves from the repository root even without an installed package.
run cd "$repo_root"
run "${command[@]}"
