#!/usr/bin/env bash
# usage: tpu_scripts/stop.sh [-t SECONDS] [--kill]
#
# Sends SIGTERM to the trainer on every worker of $TPU_NAME at once, as a TPU preemption or
# maintenance event does, and waits (up to 300 s, or -t SECONDS) for each to exit. The trainer
# saves a checkpoint and exits cleanly; launching the same command again resumes from it.
#   --kill   SIGKILL instead: ends a hung trainer at once, without a checkpoint

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

args=(stop -t 300)
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -t) [[ "${2:-}" =~ ^[0-9]+$ ]] || die "-t needs a number of seconds"; args[2]=$2; shift 2 ;;
    --kill) args+=(--kill); shift ;;
    *) die "unknown argument '$1' (-h for help)" ;;
  esac
done
need_gcloud
need_vars PROJECT ZONE TPU_NAME REMOTE_DIR

tpu_ssh all "$(worker_command "${args[@]}")"
