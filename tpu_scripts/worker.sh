#!/usr/bin/env bash
# usage: worker.sh COMMAND [ARGS...]   (runs on one machine: a TPU VM worker, or a GPU node)
#
# The per-machine half of the tpu_scripts: setup.sh, launch.sh, stop.sh, tail.sh and stage.sh run
# it on every worker through `gcloud ... ssh --worker=all`. It works on the repo it lives in.
#
#   setup [--jax-extra tpu|cuda12|cpu] [--python 3.12]
#                                      make .venv (Python >= 3.11; uv fetches --python when the machine
#                                      has none), pip install -e . and jax[EXTRA] (default tpu)
#   check                              jax.distributed.initialize(), then print process and device counts
#   start CMD [ARGS...]                run CMD in the background (nohup, own session), .venv/bin first on
#                                      PATH, appending to logs/train.log; refuses if one is running
#   stop [-t SECONDS] [--kill]         SIGTERM the trainer (it saves a checkpoint and exits) and wait
#   status                             running or not, and the log's last line
#   log [-n LINES] [-f]                the log's last lines, each prefixed with this host's name
#   stage gs://SRC DEST                copy (rsync) a GCS folder to the local directory DEST
#
# Environment: JAXDIFF_START_WAIT (seconds start watches the new process for an early exit, 20),
# JAX_COMPILATION_CACHE_DIR (default ~/.cache/jaxdiff/xla, so a resumed run skips recompiling).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_DIR="$ROOT/logs"
LOG_FILE="$LOG_DIR/train.log"
PID_FILE="$LOG_DIR/train.pid"
HOST="$(hostname)"
LIBTPU_INDEX="https://storage.googleapis.com/jax-releases/libtpu_releases.html"

die() {
  echo "$HOST: error: $*" >&2
  exit 1
}

usage() {
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
}

# The pid file holds the pid and the process's start time, so a recycled pid is never mistaken
# for the trainer (and never signalled). A zombie (exited, not yet reaped) is not running.
running() {
  local pid started
  [[ -s "$PID_FILE" ]] || return 1
  { read -r pid; read -r started; } < "$PID_FILE"
  [[ -n "$pid" && "$(ps -o lstart= -p "$pid" 2>/dev/null)" == "$started" ]] &&
    [[ "$(ps -o stat= -p "$pid" 2>/dev/null)" != Z* ]]
}

pick_python() {
  local py
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

cmd_setup() {
  local extra=tpu python=3.12 py version
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --jax-extra) extra=${2:?--jax-extra needs a value}; shift 2 ;;
      --python) python=${2:?--python needs a version}; shift 2 ;;
      *) die "setup: unknown argument $1" ;;
    esac
  done
  cd "$ROOT"
  if [[ ! -x .venv/bin/python ]]; then
    if py=$(pick_python); then
      "$py" -m venv .venv
    else
      # The v5e image (Ubuntu 22.04) has Python 3.10; jaxdiff needs >= 3.11: uv fetches one.
      echo "$HOST: no Python >= 3.11 with venv here; installing uv to get Python $python"
      python3 -m pip install --user --quiet uv || python3 -m pip install --user --quiet --break-system-packages uv
      "$HOME/.local/bin/uv" venv --seed --python "$python" .venv
    fi
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e .
  # jax[EXTRA] at exactly the jax version pyproject.toml resolved to, so jaxlib and libtpu match it.
  version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("jax"))')
  if [[ "$extra" == tpu ]]; then
    .venv/bin/python -m pip install --quiet "jax[tpu]==$version" -f "$LIBTPU_INDEX"
  else
    .venv/bin/python -m pip install --quiet "jax[$extra]==$version"
  fi
  # gs:// workdirs: orbax writes arrays with tensorstore but metadata through etils.epath, which
  # reaches GCS with gcsfs when TensorFlow is not installed.
  .venv/bin/python -m pip install --quiet gcsfs
  # Configs without a model folder build the CLIP tokenizer from open-clip's BPE vocabulary (as the
  # Makefile does); --no-deps keeps torch out.
  .venv/bin/python -m pip install --quiet --no-deps 'open-clip-torch>=2.24'
  echo "$HOST: set up $ROOT/.venv (jax[$extra]==$version)"
}

cmd_check() {
  cd "$ROOT"
  [[ -x .venv/bin/python ]] || die "no $ROOT/.venv: run setup first"
  timeout 600 .venv/bin/python - "$HOST" <<'PY'
import sys
import jax
try:
    jax.distributed.initialize()      # TPU pods: coordinator, process count and id from the metadata
except Exception as e:                # a single machine needs none
    print(f"{sys.argv[1]}: no multi-host runtime ({type(e).__name__}: {e})")
d = jax.devices()
print(f"{sys.argv[1]}: process {jax.process_index()} of {jax.process_count()}, "
      f"{jax.local_device_count()} local of {len(d)} devices ({d[0].device_kind})")
PY
}

cmd_start() {
  local pid wait_s=${JAXDIFF_START_WAIT:-20} waited=0
  [[ $# -gt 0 ]] || die "start needs the command to run, e.g.: start jaxdiff train --config ... --workdir ..."
  if running; then
    die "a trainer is already running here (pid $(head -n 1 "$PID_FILE")); stop it first (stop.sh)"
  fi
  [[ -x "$ROOT/.venv/bin/python" ]] || die "no $ROOT/.venv: run setup.sh first"
  mkdir -p "$LOG_DIR"
  cd "$ROOT"
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $HOST: $*" >> "$LOG_FILE"
  export PATH="$ROOT/.venv/bin:$PATH"
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jaxdiff/xla}"
  # nohup + a new session: the trainer outlives the ssh connection. All three streams are
  # redirected, so ssh does not wait for it. setsid does not fork here (we are not a group
  # leader), so $! is the trainer's own pid and SIGTERM reaches it directly.
  if command -v setsid >/dev/null 2>&1; then
    nohup setsid "$@" >> "$LOG_FILE" 2>&1 < /dev/null &
  else
    nohup "$@" >> "$LOG_FILE" 2>&1 < /dev/null &
  fi
  pid=$!
  printf '%s\n%s\n' "$pid" "$(ps -o lstart= -p "$pid")" > "$PID_FILE"
  # Bad flags or a bad config fail within seconds: report them here rather than leave a dead run.
  while (( waited < wait_s * 2 )) && running; do
    sleep 0.5
    waited=$((waited + 1))
  done
  if ! running; then
    tail -n 20 "$LOG_FILE" | sed "s/^/[$HOST] /" >&2
    die "the command exited within ${wait_s}s (log above, full log in $LOG_FILE)"
  fi
  echo "$HOST: started pid $pid, log $LOG_FILE"
}

cmd_stop() {
  local timeout=120 signal=TERM pid deadline
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -t) timeout=${2:?-t needs seconds}; shift 2 ;;
      --kill) signal=KILL; shift ;;
      *) die "stop: unknown argument $1" ;;
    esac
  done
  if ! running; then
    echo "$HOST: no trainer running"
    return 0
  fi
  pid=$(head -n 1 "$PID_FILE")
  kill -s "$signal" "$pid"
  echo "$HOST: sent SIG$signal to pid $pid, waiting up to ${timeout}s for it to exit"
  deadline=$((SECONDS + timeout))
  while running; do
    (( SECONDS < deadline )) || die "pid $pid still running after ${timeout}s; stop.sh --kill ends it without a checkpoint"
    sleep 0.2
  done
  echo "$HOST: stopped; the log ends:"
  tail -n 3 "$LOG_FILE" | sed "s/^/[$HOST] /"
}

cmd_status() {
  local last=""
  [[ -e "$LOG_FILE" ]] && last=$(tail -n 1 "$LOG_FILE")
  if running; then
    echo "$HOST: running (pid $(head -n 1 "$PID_FILE")): $last"
  else
    echo "$HOST: not running; last log line: ${last:-(no log)}"
  fi
}

cmd_log() {
  local lines=50 follow=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -n) lines=${2:?-n needs a number}; shift 2 ;;
      -f) follow=(-F); shift ;;
      *) die "log: unknown argument $1" ;;
    esac
  done
  [[ -e "$LOG_FILE" ]] || die "no log yet at $LOG_FILE"
  tail -n "$lines" ${follow[@]+"${follow[@]}"} "$LOG_FILE" | sed -u "s/^/[$HOST] /"
}

cmd_stage() {
  [[ $# -eq 2 && "$1" == gs://* ]] || die "usage: stage gs://BUCKET/PATH LOCAL_DIR"
  mkdir -p "$2"
  # rsync: a re-run (after a preemption and re-creation, or to resume a copy) only fetches what is missing.
  if gcloud storage rsync --help >/dev/null 2>&1; then
    gcloud storage rsync --recursive "$1" "$2"
  else
    gsutil -m -q rsync -r "$1" "$2"
  fi
  echo "$HOST: $1 -> $2 ($(du -sh "$2" | cut -f1))"
}

case "${1:-}" in
  -h|--help|"") usage; [[ -n "${1:-}" ]] ;;
  setup|check|start|stop|status|log|stage) cmd=$1; shift; "cmd_$cmd" "$@" ;;
  *) die "unknown command '$1' (setup, check, start, stop, status, log, stage; -h for help)" ;;
esac
