#!/usr/bin/env bash
# usage: tpu_scripts/setup.sh [--no-check]
#
# Puts the repo on every worker of $TPU_NAME and installs it there, all workers at once:
#   1. the code: with REPO_URL set, `git clone` it (REPO_REF) into ~/$REMOTE_DIR, or update a
#      clone already there; otherwise copy this checkout as it is (tracked and untracked files that
#      git does not ignore, uncommitted changes included) over ~/$REMOTE_DIR
#   2. `worker.sh setup`: a .venv with Python >= 3.11, `pip install -e .`, then jax[tpu] at the same
#      jax version from the libtpu index (pip install "jax[tpu]==V" -f .../libtpu_releases.html)
#   3. `worker.sh check` (unless --no-check): every worker joins jax.distributed and prints its
#      process index and device counts; a v5litepod-16 shows 4 processes and 16 devices
# Re-running it is safe (it updates the code and reinstalls what changed).

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

check=true
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --no-check) check=false; shift ;;
    *) die "unknown argument '$1' (-h for help)" ;;
  esac
done
need_gcloud
need_vars PROJECT ZONE TPU_NAME REMOTE_DIR

if [[ -n "$REPO_URL" ]]; then
  fetch=$(printf 'if [ -d %q/.git ]; then git -C %q fetch --quiet origin %q && git -C %q checkout --quiet FETCH_HEAD; else git clone --quiet %q %q && git -C %q checkout --quiet %q; fi' \
    "$REMOTE_DIR" "$REMOTE_DIR" "$REPO_REF" "$REMOTE_DIR" "$REPO_URL" "$REMOTE_DIR" "$REMOTE_DIR" "$REPO_REF")
  tpu_ssh all "$fetch"
else
  root="$(cd "$TPU_SCRIPTS/.." && pwd)"
  git -C "$root" rev-parse --git-dir >/dev/null 2>&1 || die "$root is not a git checkout: set REPO_URL to clone instead"
  tarball="$(mktemp "${TMPDIR:-/tmp}/jaxdiff-src.XXXXXX")"
  trap 'rm -f "$tarball"' EXIT
  # Files git tracks or would track, minus tracked files deleted in the working tree.
  git -C "$root" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do if [[ -e "$root/$f" ]]; then printf '%s\0' "$f"; fi; done |
    tar -C "$root" --null -T - -czf "$tarball"
  echo "copying $(du -h "$tarball" | cut -f1) of source to every worker of $TPU_NAME"
  tpu_scp_all "$tarball" jaxdiff-src.tar.gz
  tpu_ssh all "$(printf 'mkdir -p %q && tar -xzf jaxdiff-src.tar.gz -C %q && rm jaxdiff-src.tar.gz' "$REMOTE_DIR" "$REMOTE_DIR")"
fi

tpu_ssh all "$(worker_command setup --python "$PYTHON_VERSION")"
if [[ "$check" == true ]]; then
  # A separate call, so every worker starts it at the same moment: they wait for each other.
  tpu_ssh all "$(worker_command check)"
fi
echo "set up $TPU_NAME; next: tpu_scripts/launch.sh (or tpu_scripts/finetune_sd15_v5e.sh)"
