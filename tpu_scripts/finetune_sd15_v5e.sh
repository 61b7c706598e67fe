#!/usr/bin/env bash
# usage: tpu_scripts/finetune_sd15_v5e.sh [--no-stage] [-- EXTRA_TRAIN_ARGS...]
#
# The worked example: fine-tune Stable Diffusion 1.5 on a v5e-16 slice (v5litepod-16: 4 workers x
# 4 chips, 16 GB HBM per chip), after create.sh and setup.sh. It
#   1. stages the model and the data onto every worker's disk (stage.sh; skipped with --no-stage):
#        $MODEL_GCS  a diffusers folder of sd15      -> $STAGE_DIR/sd15
#        $DATA_GCS   img2dataset webdataset tars     -> $STAGE_DIR/data
#   2. launches on all workers (launch.sh):
#        jaxdiff train --config configs/sd15_finetune.py --workdir $WORKDIR
#          --config.model.model_dir=$STAGE_DIR/sd15 --config.data.source=folder:$STAGE_DIR/data
#          --config.data.global_batch=$GLOBAL_BATCH --config.mesh.shape=$MESH
# Settings (environment): MODEL_GCS, DATA_GCS (required); WORKDIR (default
# $BUCKET/jaxdiff/runs/$RUN_NAME, RUN_NAME default sd15-v5e16); GLOBAL_BATCH (128: 8 per chip);
# MESH (data, fsdp, tensor) = (1,-1,1): FSDP over all 16 chips. Why: tpu_scripts/README.md.
# Arguments after -- are added to the jaxdiff train command (e.g. --config.KEY=VALUE).

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${MODEL_GCS:=}"
: "${DATA_GCS:=}"
: "${RUN_NAME:=sd15-v5e16}"
: "${WORKDIR:=${BUCKET:+${BUCKET%/}/jaxdiff/runs/$RUN_NAME}}"
: "${GLOBAL_BATCH:=128}"
: "${MESH:=(1,-1,1)}"

stage=true extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --no-stage) stage=false; shift ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1' (-h for help)" ;;
  esac
done
[[ -n "$WORKDIR" ]] || die "set BUCKET=gs://... (or WORKDIR=gs://...): checkpoints and TensorBoard logs go there"
[[ "$WORKDIR" == gs://* ]] || die "WORKDIR must be a gs:// path, which all 4 workers share; got '$WORKDIR'"
need_vars STAGE_DIR
[[ "$stage" == false ]] || need_vars MODEL_GCS DATA_GCS
[[ "$ACCELERATOR_TYPE" == v5litepod-16 ]] ||
  echo "note: this example is sized for v5litepod-16 (16 chips); ACCELERATOR_TYPE is $ACCELERATOR_TYPE" >&2

if [[ "$stage" == true ]]; then
  "$TPU_SCRIPTS/stage.sh" "$MODEL_GCS" "$STAGE_DIR/sd15"
  "$TPU_SCRIPTS/stage.sh" "$DATA_GCS" "$STAGE_DIR/data"
fi
"$TPU_SCRIPTS/launch.sh" -- \
  --config configs/sd15_finetune.py \
  --workdir "$WORKDIR" \
  --config.model.model_dir="$STAGE_DIR/sd15" \
  --config.data.source="folder:$STAGE_DIR/data" \
  --config.data.global_batch="$GLOBAL_BATCH" \
  --config.mesh.shape="$MESH" \
  ${extra[@]+"${extra[@]}"}
