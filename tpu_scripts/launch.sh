#!/usr/bin/env bash
# usage: tpu_scripts/launch.sh [-e NAME=VALUE]... [--] TRAIN_ARGS...
#
# Runs `jaxdiff train TRAIN_ARGS...` on every worker of $TPU_NAME at once (gcloud ... ssh
# --worker=all), in the background (nohup, its own session), so it outlives this shell. Each worker
# appends its output to ~/$REMOTE_DIR/logs/train.log; follow them with tail.sh.
#   -e NAME=VALUE   an environment variable for the trainer (repeatable), e.g. -e LIBTPU_INIT_ARGS=...
# Example:
#   tpu_scripts/launch.sh --config configs/sd15_finetune.py --workdir gs://BUCKET/runs/sd15 \
#       --config.model.model_dir=/var/tmp/jaxdiff/sd15 --config.mesh.shape='(1,-1,1)'
# Each worker's jaxdiff finds the others through the TPU metadata (jax.distributed.initialize()).
# A worker that fails within 20 s prints its log and makes this command fail; the others then
# wait for it at start-up: end them with tpu_scripts/stop.sh. To resume after a stop or a
# preemption, launch the same command again: the trainer resumes from --workdir's last checkpoint.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

envs=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -e) [[ "${2:-}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "-e needs NAME=VALUE, got '${2:-}'"
        envs+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || die "no training arguments given; e.g. launch.sh --config configs/NAME.py --workdir DIR (-h for help)"
need_gcloud
need_vars PROJECT ZONE TPU_NAME REMOTE_DIR

# Every worker writes its shards of each checkpoint under --workdir, so on a multi-host slice it
# must be one shared place: a gs:// path.
workdir="" prev=""
for arg in "$@"; do
  if [[ "$prev" == --workdir ]]; then workdir=$arg; fi
  if [[ "$arg" == --workdir=* ]]; then workdir=${arg#--workdir=}; fi
  prev=$arg
done
if [[ "$workdir" != gs://* ]]; then
  echo "warning: --workdir '$workdir' is not a gs:// path; on a multi-host slice the workers need a shared one" >&2
fi

# worker.sh start [env NAME=VALUE...] jaxdiff train ARGS: `env` sets the variables for the trainer.
command=(start)
[[ ${#envs[@]} -eq 0 ]] || command+=(env "${envs[@]}")
command+=(jaxdiff train --distributed "$@")
tpu_ssh all "$(worker_command "${command[@]}")" ||
  die "starting on some worker failed (its log is above); end the others with tpu_scripts/stop.sh"
echo "running on every worker of $TPU_NAME: follow with tpu_scripts/tail.sh, stop (saves a checkpoint) with tpu_scripts/stop.sh"
