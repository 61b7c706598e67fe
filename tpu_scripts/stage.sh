#!/usr/bin/env bash
# usage: tpu_scripts/stage.sh gs://BUCKET/PATH LOCAL_DIR
#
# Copies a GCS folder (a diffusers model folder, img2dataset tar shards, ...) to LOCAL_DIR on every
# worker of $TPU_NAME at once, with `gcloud storage rsync`, so a re-run only fetches what is
# missing. Every worker needs the whole data set: the input pipeline indexes all records (in the
# same sorted order everywhere) and then each host reads only its own contiguous shard of them.
# LOCAL_DIR is on the workers' boot disks (100 GB on v5e); for more, attach a disk or mount the
# bucket with gcsfuse and point --config.data.source at the mount.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac
[[ $# -eq 2 && "$1" == gs://* && -n "$2" ]] || die "need gs://BUCKET/PATH and LOCAL_DIR (-h for help)"
need_gcloud
need_vars PROJECT ZONE TPU_NAME REMOTE_DIR

tpu_ssh all "$(worker_command stage "$1" "$2")"
