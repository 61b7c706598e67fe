#!/usr/bin/env bash
# usage: tpu_scripts/tail.sh [-w WORKER] [-n LINES] [--once]
#
# Follows the trainer's log (~/$REMOTE_DIR/logs/train.log) on worker 0 of $TPU_NAME, where the
# progress bar and the losses are printed; each line is prefixed with the worker's host name.
#   -w WORKER   another worker (an index), a list like 1,3, or all
#   -n LINES    lines of history to show first (default 50)
#   --once      print and return instead of following (Ctrl-C ends following)

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

worker=0 lines=50 follow=(-f)
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -w) worker=${2:?-w needs a worker: an index, a list like 1,3, or all}; shift 2 ;;
    -n) [[ "${2:-}" =~ ^[0-9]+$ ]] || die "-n needs a number of lines"; lines=$2; shift 2 ;;
    --once) follow=(); shift ;;
    *) die "unknown argument '$1' (-h for help)" ;;
  esac
done
need_gcloud
need_vars PROJECT ZONE TPU_NAME REMOTE_DIR

tpu_ssh "$worker" "$(worker_command log -n "$lines" ${follow[@]+"${follow[@]}"})"
