#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice) launcher for mtt_jax. See launch/README.md.
#
#   bash launch/tpu_vm.sh up --name my-tpu --zone us-central2-b --workdir gs://BUCKET/runs/r1
#   bash launch/tpu_vm.sh logs delete --name my-tpu --zone us-central2-b
#
# Every step is one or two gcloud commands; --dry-run prints them (one per line, shell-quoted so
# they can be pasted) and runs nothing.
set -euo pipefail

SCRIPT=${BASH_SOURCE[0]}
PROG=${SCRIPT##*/}
[[ $SCRIPT == */* ]] && SCRIPT_DIR=${SCRIPT%/*} || SCRIPT_DIR=.
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

usage() {
  cat <<EOF
Usage: bash launch/$PROG STEP [STEP...] --name NAME --zone ZONE [options] [-- MAIN_ARGS...]

Runs mtt_jax on a Cloud TPU VM (single host or pod slice) through gcloud. Steps run in the
order given:

  create   gcloud compute tpus tpu-vm create NAME (accelerator type, runtime version, --spot)
  copy     copy the code (mtt_jax/ configs/ experiments/ requirements.txt) to ~/REMOTE_DIR
           on every worker (scp --recurse --worker=all)
  setup    on every worker: a virtual environment ~/REMOTE_DIR/.venv with Python PY_VERSION
           (made by uv, which downloads that Python: the image's python3 is too old for jax),
           then requirements.txt and JAX for TPU in it
  train    start '.venv/bin/python -m mtt_jax.main --config CONFIG --workdir WORKDIR MAIN_ARGS' on every
           worker (--worker=all) in the background with nohup; output is appended to
           ~/REMOTE_DIR/LOG_FILE on each worker. Refuses to start if a run is already going.
           With --wait it runs in the foreground and the step fails when training fails.
  stop     send SIGTERM to the training processes on every worker (a checkpoint is written)
  logs     copy ~/REMOTE_DIR/LOG_FILE from worker 0 (or --worker N) into LOGS_DIR
  delete   gcloud compute tpus tpu-vm delete NAME --quiet
  up       = create copy setup train
  all      = create copy setup train logs delete, training in the foreground (--wait); the logs
           are fetched and the VM deleted even if training fails, and the exit status is that of
           the training run

Options (both '--opt VALUE' and '--opt=VALUE' work):
  --name NAME               TPU VM name (required; lowercase letters, digits, hyphens)
  --zone ZONE               zone, e.g. us-central2-b (required)
  --project PROJECT         GCP project (default: gcloud's configured project)
  --accelerator-type TYPE   default v4-8 (one host); e.g. v4-32 is a 4-host pod slice
  --version RUNTIME         TPU software version, default tpu-ubuntu2204-base
  --spot                    create a Spot (preemptible) TPU VM
  --config FILE[:VARIANT]   config for mtt_jax.main, default configs/default.py
  --workdir DIR             run directory (required for train). Use gs://BUCKET/PATH (or a
                            gcsfuse mount, /gcs/BUCKET/PATH) on a pod slice or a Spot VM: every
                            host writes to the same place and the checkpoints outlive the VM. A
                            local path is relative to ~/REMOTE_DIR on each worker and is deleted
                            with the VM.
  --remote-dir DIR          code directory under the remote home, default mtt_jax
  --log-file FILE           training log under ~/REMOTE_DIR, default train.log
  --logs-dir DIR            local directory for 'logs', default tpu_logs/NAME
  --worker N                worker whose log 'logs' fetches, default 0
  --jax SPEC                pip requirement for JAX on TPU, default 'jax[tpu]==0.10.2'
  --python-version V        Python of the remote virtual environment, default 3.11
  --wait                    run 'train' in the foreground (output also shown here)
  --dry-run                 print every gcloud command, one per line, and run none
  -h, --help                this text
  -- MAIN_ARGS...           passed to mtt_jax.main, e.g. -- --config.total_steps=1000

Preemption: rerun the same command ('up' after re-creating, or 'train' on a live VM) with the
same --workdir; the run continues from its last checkpoint.

Example:
  bash launch/$PROG up --name mtt-v4 --zone us-central2-b --accelerator-type v4-32 \\
      --config configs/default.py --workdir gs://my-bucket/mtt/run1 -- --config.total_steps=20000
  bash launch/$PROG logs --name mtt-v4 --zone us-central2-b
  bash launch/$PROG delete --name mtt-v4 --zone us-central2-b
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

# Shell-quote one word (for bash): bare when it has only safe characters, in double quotes when
# nothing in it is special there, in single quotes otherwise.
q() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,^-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s != *[\$\`\"\\!]* ]]; then
    printf '"%s"' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Shell-quote a command line.
qcmd() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(q "$w")"
  done
  printf '%s' "$out"
}

# Run (or, with --dry-run, print) one command.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(qcmd "$@")"
  else
    printf '+ %s\n' "$(qcmd "$@")" >&2
    "$@"
  fi
}

# ---------------------------------------------------------------------------------------------
# Arguments.

NAME=""
ZONE=""
PROJECT=""
ACCEL="v4-8"
VERSION="tpu-ubuntu2204-base"
SPOT=0
CONFIG="configs/default.py"
WORKDIR=""
REMOTE_DIR="mtt_jax"
LOG_FILE="train.log"
LOGS_DIR=""
WORKER="0"
JAX_SPEC="jax[tpu]==0.10.2"
PY_VERSION="3.11"
WAIT=0
DRY_RUN=0
STEPS=()
MAIN_ARGS=()

set_opt() {
  case "$1" in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator-type) ACCEL=$2 ;;
    --version) VERSION=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --remote-dir) REMOTE_DIR=$2 ;;
    --log-file) LOG_FILE=$2 ;;
    --logs-dir) LOGS_DIR=$2 ;;
    --worker) WORKER=$2 ;;
    --jax) JAX_SPEC=$2 ;;
    --python-version) PY_VERSION=$2 ;;
    *) die "unknown option $1; see --help" ;;
  esac
}

VALUE_OPTS="--name --zone --project --accelerator-type --version --config --workdir --remote-dir \
--log-file --logs-dir --worker --jax --python-version"

while (($#)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --wait) WAIT=1 ;;
    --)
      shift
      MAIN_ARGS=("$@")
      break
      ;;
    --*=*)
      set_opt "${1%%=*}" "${1#*=}"
      ;;
    --*)
      if [[ " $VALUE_OPTS " == *" $1 "* ]]; then
        (($# >= 2)) || die "$1 needs a value; see --help"
        set_opt "$1" "$2"
        shift
      else
        die "unknown option $1; see --help"
      fi
      ;;
    -*) die "unknown option $1; see --help" ;;
    *) STEPS+=("$1") ;;
  esac
  shift
done

# Expand the aliases and check the steps.
CLEANUP=0
EXPANDED=()
for s in ${STEPS[@]+"${STEPS[@]}"}; do
  case "$s" in
    create | copy | setup | train | stop | logs | delete) EXPANDED+=("$s") ;;
    up) EXPANDED+=(create copy setup train) ;;
    all)
      EXPANDED+=(create copy setup train logs delete)
      WAIT=1
      CLEANUP=1
      ;;
    *) die "unknown step '$s' (create, copy, setup, train, stop, logs, delete, up, all); see --help" ;;
  esac
done
((CLEANUP == 0 || ${#STEPS[@]} == 1)) || die "'all' runs every step; give it alone"
((${#EXPANDED[@]})) || die "no step given (create, copy, setup, train, stop, logs, delete, up, all); see --help"

[[ -n $NAME ]] || die "--name is required (the TPU VM name, e.g. --name mtt-v4); see --help"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$NAME' is not a valid TPU name (lowercase letters, digits and hyphens, starting with a letter)"
[[ -n $ZONE ]] || die "--zone is required (e.g. --zone us-central2-b); see --help"
[[ -n $ACCEL ]] || die "--accelerator-type must not be empty (e.g. v4-8)"
[[ -n $VERSION ]] || die "--version must not be empty (e.g. tpu-ubuntu2204-base)"
[[ $PY_VERSION =~ ^3[.][0-9]+([.][0-9]+)?$ ]] || die "--python-version must look like 3.11, got '$PY_VERSION'"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker number (0, 1, ...), got '$WORKER'"
[[ $REMOTE_DIR =~ ^[A-Za-z0-9_][A-Za-z0-9_./-]*$ && $REMOTE_DIR != *..* ]] ||
  die "--remote-dir must be a plain relative path under the remote home (e.g. mtt_jax), got '$REMOTE_DIR'"
[[ $LOG_FILE =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] ||
  die "--log-file must be a plain file name (e.g. train.log), got '$LOG_FILE'"
for s in "${EXPANDED[@]}"; do
  if [[ $s == train ]]; then
    [[ -n $WORKDIR ]] ||
      die "--workdir is required for train (e.g. --workdir gs://BUCKET/mtt/run1); see --help"
    [[ -n $CONFIG ]] || die "--config must not be empty (e.g. --config configs/default.py)"
  fi
done
LOGS_DIR=${LOGS_DIR:-tpu_logs/$NAME}

GFLAGS=(--zone="$ZONE")
[[ -z $PROJECT ]] || GFLAGS+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

# ---------------------------------------------------------------------------------------------
# Steps. Each returns the status of its (last) gcloud command.

step_create() {
  local cmd=("${TPU[@]}" create "$NAME" "${GFLAGS[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  ((SPOT)) && cmd+=(--spot)
  run "${cmd[@]}"
}

step_copy() {
  local items=() p
  for p in mtt_jax configs experiments requirements.txt; do
    [[ -e $REPO_ROOT/$p ]] && items+=("$p")
  done
  ((${#items[@]})) || die "nothing to copy: no mtt_jax/ under $REPO_ROOT"
  run "${TPU[@]}" ssh "$NAME" "${GFLAGS[@]}" --worker=all --command "mkdir -p $(q "$REMOTE_DIR")" || return
  # Paths are relative to the repository root, so the copy runs from there.
  (cd "$REPO_ROOT" && run "${TPU[@]}" scp --recurse "${items[@]}" "$NAME:$REMOTE_DIR/" "${GFLAGS[@]}" --worker=all)
}

# The remote virtual environment, relative to REMOTE_DIR.
VENV_PY=.venv/bin/python

step_setup() {
  local remote
  remote="cd $(q "$REMOTE_DIR") && python3 -m pip install --user -U uv"
  remote+=" && python3 -m uv venv --allow-existing --python $(q "$PY_VERSION") .venv"
  remote+=" && python3 -m uv pip install --python $VENV_PY -r requirements.txt $(q "$JAX_SPEC")"
  run "${TPU[@]}" ssh "$NAME" "${GFLAGS[@]}" --worker=all --command "$remote"
}

# The training process is found by its command line (anchored, so that the remote shell whose
# command line holds the training command does not match).
TRAIN_PATTERN='^[^ ]*python[0-9.]* -m mtt_jax[.]main '

step_train() {
  local main remote
  main=$(qcmd "$VENV_PY" -m mtt_jax.main --config="$CONFIG" --workdir="$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"})
  remote="cd $(q "$REMOTE_DIR") || exit 1"
  remote+="; if pgrep -f $(q "$TRAIN_PATTERN") >/dev/null; then"
  remote+=" echo \"\$(hostname): mtt_jax.main is already running; use the stop step first\" >&2; exit 1; fi"
  if ((WAIT)); then
    remote+="; set -o pipefail; $main 2>&1 | tee -a $(q "$LOG_FILE")"
  else
    remote+="; nohup $main >> $(q "$LOG_FILE") 2>&1 < /dev/null &"
    remote+=" echo \"\$(hostname): started mtt_jax.main (pid \$!), log ~/$REMOTE_DIR/$LOG_FILE\""
  fi
  run "${TPU[@]}" ssh "$NAME" "${GFLAGS[@]}" --worker=all --command "$remote"
}

step_stop() {
  local remote="pkill -TERM -f $(q "$TRAIN_PATTERN") && echo \"\$(hostname): sent SIGTERM\""
  remote+=" || echo \"\$(hostname): not running\""
  run "${TPU[@]}" ssh "$NAME" "${GFLAGS[@]}" --worker=all --command "$remote"
}

step_logs() {
  ((DRY_RUN)) || mkdir -p "$LOGS_DIR"
  run "${TPU[@]}" scp "$NAME:$REMOTE_DIR/$LOG_FILE" "$LOGS_DIR/" "${GFLAGS[@]}" --worker="$WORKER"
}

step_delete() {
  run "${TPU[@]}" delete "$NAME" "${GFLAGS[@]}" --quiet
}

# ---------------------------------------------------------------------------------------------

if ! ((DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
fi

if ((CLEANUP)); then
  # 'all': once the VM exists, always fetch the logs and delete it; exit with the first failure.
  rc=0
  step_create || exit
  for s in copy setup train; do
    "step_$s" || { rc=$?; echo "$PROG: step $s failed (status $rc); fetching logs and deleting $NAME" >&2; break; }
  done
  step_logs || echo "$PROG: could not fetch the log" >&2
  step_delete || { echo "$PROG: could not delete $NAME; delete it by hand" >&2; ((rc)) || rc=1; }
  exit "$rc"
fi

for s in "${EXPANDED[@]}"; do
  "step_$s" || { rc=$?; echo "$PROG: step $s failed (status $rc)" >&2; exit "$rc"; }
done
