#!/usr/bin/env bash
# usage: tpu_scripts/delete.sh [--queued] [-y]
#
# Deletes the TPU VM slice $TPU_NAME in $ZONE (billing stops; the workers' disks go with it, the
# checkpoints in gs:// stay).
#   --queued   delete the queued resource $QUEUED_RESOURCE and its node (create.sh --queued)
#   -y         do not ask for confirmation
# Stop the trainer first (tpu_scripts/stop.sh) if you want a final checkpoint.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

queued=false quiet=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --queued) queued=true; shift ;;
    -y|--yes) quiet=(--quiet); shift ;;
    *) die "unknown argument '$1' (-h for help)" ;;
  esac
done
need_gcloud
need_vars PROJECT ZONE TPU_NAME

if [[ "$queued" == true ]]; then
  need_vars QUEUED_RESOURCE
  gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" --project="$PROJECT" --zone="$ZONE" --force \
    ${quiet[@]+"${quiet[@]}"}
else
  gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" ${quiet[@]+"${quiet[@]}"}
fi
