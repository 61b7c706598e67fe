#!/usr/bin/env bash
# usage: tpu_scripts/create.sh [--spot] [--queued [--wait]] [-- EXTRA_GCLOUD_FLAGS...]
#
# Creates the TPU VM slice $TPU_NAME ($ACCELERATOR_TYPE, runtime $RUNTIME_VERSION) in $ZONE.
#   --spot     Spot capacity: much cheaper, can be preempted at any time (the trainer then saves a
#              checkpoint on SIGTERM; re-create, set up and launch the same command to resume)
#   --queued   ask through a queued resource ($QUEUED_RESOURCE, node id $TPU_NAME): the request
#              waits in a queue until capacity is free, which Google recommends for v5e
#   --wait     with --queued: poll every 30 s until the queued resource is ACTIVE (or FAILED)
# Flags after -- go to gcloud unchanged (e.g. -- --network=my-net --service-account=...).
# Needs PROJECT; see tpu_scripts/config.sh for every setting.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

spot=() queued=false wait=false extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --spot) spot=(--spot); shift ;;
    --queued) queued=true; shift ;;
    --wait) wait=true; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1' (-h for help)" ;;
  esac
done
[[ "$wait" == false || "$queued" == true ]] || die "--wait only applies with --queued"
need_gcloud
need_vars PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION

if [[ "$queued" == false ]]; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${spot[@]+"${spot[@]}"} ${extra[@]+"${extra[@]}"}
  echo "created $TPU_NAME; next: tpu_scripts/setup.sh"
  exit 0
fi

need_vars QUEUED_RESOURCE
gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" --project="$PROJECT" \
  --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
  ${spot[@]+"${spot[@]}"} ${extra[@]+"${extra[@]}"}
describe=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --project="$PROJECT" --zone="$ZONE")
if [[ "$wait" == false ]]; then
  echo "queued $QUEUED_RESOURCE; it is ready when this says ACTIVE:"
  echo "  ${describe[*]} --format='value(state.state)'"
  exit 0
fi
while true; do
  state=$("${describe[@]}" --format='value(state.state)')
  echo "$(date +%H:%M:%S) $QUEUED_RESOURCE: $state"
  case "$state" in
    ACTIVE) echo "next: tpu_scripts/setup.sh"; exit 0 ;;
    FAILED|SUSPENDING|SUSPENDED) die "$QUEUED_RESOURCE is $state: see '${describe[*]}'" ;;
  esac
  sleep "${CREATE_POLL_SECONDS:-30}"
done
