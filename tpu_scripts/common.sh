# shellcheck shell=bash source-path=SCRIPTDIR
# Helpers shared by the tpu_scripts (sourced, never run): config, errors, and gcloud calls on the slice.
# Kept to bash 3.2 (macOS) features: these run on the user's own machine.

TPU_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=config.sh
source "$TPU_SCRIPTS/config.sh"

die() {
  echo "error: $*" >&2
  exit 1
}

# Usage text is the script's header comment: the lines after the shebang, up to the first blank line.
usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

need_gcloud() {
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found on PATH. Install the Google Cloud CLI" \
    "(https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login'."
}

need_vars() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "$name is not set: export $name=... or set it in tpu_scripts/config.sh"
  done
}

# Runs COMMAND (a shell string) with `tpu-vm ssh` on WORKER: an index, a list like 1,3, or all.
tpu_ssh() {
  local worker=$1 command=$2 extra
  read -r -a extra <<< "$GCLOUD_SSH_FLAGS"
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --worker="$worker" \
    ${extra[@]+"${extra[@]}"} --command="$command"
}

# Copies a local file to PATH (relative to the home directory) on every worker.
tpu_scp_all() {
  local src=$1 dest=$2 extra
  read -r -a extra <<< "$GCLOUD_SSH_FLAGS"
  gcloud compute tpus tpu-vm scp "$src" "$TPU_NAME:$dest" --project="$PROJECT" --zone="$ZONE" --worker=all \
    ${extra[@]+"${extra[@]}"}
}

# The shell string that runs tpu_scripts/worker.sh with ARGS inside the repo on a worker; every
# argument is quoted with printf %q, so values with spaces, parentheses or $ arrive unchanged.
worker_command() {
  local quoted
  quoted=$(printf ' %q' "$@")
  printf 'cd %q && bash tpu_scripts/worker.sh%s' "$REMOTE_DIR" "$quoted"
}
