#!/usr/bin/env bash
# The TPU slice every tpu_scripts/ command works on. Sourced by the scripts; each value can be
# overridden from the environment (e.g. `ZONE=europe-west4-b tpu_scripts/create.sh`).
# `bash tpu_scripts/config.sh` prints the values in effect.
set -euo pipefail

: "${PROJECT:=${CLOUDSDK_CORE_PROJECT:-}}"       # Google Cloud project (required)
: "${ZONE:=us-west4-a}"                          # a zone with v5e capacity (also us-east5-b, europe-west4-b, ...)
: "${TPU_NAME:=jaxdiff-v5e-16}"
: "${ACCELERATOR_TYPE:=v5litepod-16}"            # v5e, 16 chips: 4 TPU VM workers x 4 chips
: "${RUNTIME_VERSION:=v2-alpha-tpuv5-lite}"      # the TPU VM image for v5e (Ubuntu 22.04)
: "${QUEUED_RESOURCE:=${TPU_NAME}-qr}"           # used with create.sh --queued / delete.sh --queued
: "${BUCKET:=}"                                  # gs://your-bucket: checkpoints, TensorBoard logs, staged data
: "${REPO_URL:=}"                                # git URL to clone on the workers; empty: copy this checkout
: "${REPO_REF:=main}"                            # branch, tag or commit of REPO_URL
: "${REMOTE_DIR:=jaxdiff}"                       # the repo on each worker (relative to the home directory)
: "${STAGE_DIR:=/var/tmp/jaxdiff}"               # where stage.sh puts models and data on each worker
: "${PYTHON_VERSION:=3.12}"                      # used when the image has no Python >= 3.11 (via uv)
: "${GCLOUD_SSH_FLAGS:=}"                        # extra flags for every `tpu-vm ssh/scp`, e.g. --internal-ip

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    echo "usage: bash tpu_scripts/config.sh"
    echo "Prints the slice configuration that the tpu_scripts use (override any value from the environment)."
    exit 0
  fi
  for name in PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION QUEUED_RESOURCE BUCKET REPO_URL \
              REPO_REF REMOTE_DIR STAGE_DIR PYTHON_VERSION GCLOUD_SSH_FLAGS; do
    printf '%-17s %s\n' "$name" "${!name}"
  done
fi
