#!/bin/bash
# Generic Slurm job script for megatron_lomdm: one task per GPU (or per CPU process where there is
# none: gloo), rendezvous from Slurm's variables, auto-resume from run.dir, requeue on preemption.
#
#   sbatch [sbatch options] slurm/train.sh --config FILE [dotted.key=value ...]
#   e.g. sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 \
#            slurm/train.sh --config configs/experiments/owt_1b.yaml
#        sbatch -O --ntasks=2 slurm/train.sh --config configs/experiments/tiny_cpu.yaml   (CPU, gloo)
#
# Submit from the repository root (or set LOMDM_ROOT): the job runs in the submit directory, so a
# relative run.dir / data path means the same thing to every (re)start. The run directory is the
# config's run.dir, never the job id: a requeued job finds its checkpoints there and resumes.
#
# What to change: resources are sbatch options (the recipes slurm/owt_1b.sh etc. set them);
# partition/account/qos go on the sbatch command line (or SBATCH_PARTITION / SBATCH_ACCOUNT);
# LOMDM_PYTHON picks the interpreter (default: the repo's .venv/bin/python, else python).
#
# Preemption and time limits: Slurm sends SIGUSR1 to this shell (B:) <s> seconds before the time
# limit (it may arrive up to 60 s early), and on preemption when the cluster sets
# SlurmctldParameters=preempt_send_user_signal. The shell forwards it (and SIGTERM) to the training
# tasks, which finish the step, checkpoint and exit 3; the shell then runs `scontrol requeue`.
# Exit code 3 from the tasks alone also requeues. Raise @<s> if a checkpoint takes longer to save.
# On demand: `scancel --signal=USR1 --batch <jobid>` (this shell) or `scancel --signal=USR1 <jobid>`
# (the tasks) checkpoints and requeues. `scontrol requeue <jobid>` sends SIGTERM to everything at
# once, and srun answers TERM by killing the step after KillWait: only that long to checkpoint.
#
#SBATCH --job-name=lomdm
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
# Exit codes of the training CLI (megatron_lomdm/train.py): 0 done, 2 bad config/input, 3 preempted.

set -uo pipefail

log() { echo "[slurm/train.sh $(date +%H:%M:%S)] $*" >&2; }

# --- where the repository is -------------------------------------------------------------------
# sbatch runs a copy of this file from the spool, so its own path says nothing; the submit dir does.
find_root() {
    if [ -n "${LOMDM_ROOT:-}" ]; then echo "$LOMDM_ROOT"; return; fi
    if [ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/slurm/train.sh" ]; then
        echo "$SLURM_SUBMIT_DIR"; return
    fi
    if [ -n "${SLURM_JOB_ID:-}" ]; then  # submitted from elsewhere: the original script's path
        local cmd
        cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Command=[^ ]*' | cut -d= -f2-)
        if [ -n "$cmd" ] && [ -f "$(dirname "$cmd")/train.sh" ]; then
            (cd "$(dirname "$cmd")/.." && pwd); return
        fi
    fi
    (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}
ROOT=$(find_root)
export LOMDM_ROOT=$ROOT
if [ -n "${LOMDM_PYTHON:-}" ]; then PY=$LOMDM_PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python || command -v python3); fi
export PYTHONUNBUFFERED=1
# One thread per task unless Slurm gave the task more CPUs (set OMP_NUM_THREADS to override).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# --- signals: remember, forward to the training step -------------------------------------------
SRUN_PID=""
GOT_SIGNAL=""
on_signal() {
    GOT_SIGNAL=$1
    log "caught SIG$1"
    if [ -n "$SRUN_PID" ]; then forward "$1"; fi
}
forward() {
    # Always relay as USR1: the tasks treat USR1 and TERM alike (set a flag, finish the step,
    # checkpoint, exit 3), while srun itself answers TERM by killing the step. srun relays USR1 to
    # every task of the step; scancel (steps only, not this shell) is the fallback.
    log "forwarding SIG$1 to the training step as SIGUSR1"
    kill -s USR1 "$SRUN_PID" 2>/dev/null || scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || true
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

requeue() {
    local state
    state=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
    if [ "$state" = CANCELLED ]; then log "job was cancelled: not requeueing"; return; fi
    log "requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0} -> $(( ${SLURM_RESTART_COUNT:-0} + 1 )))"
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed (state $state)"
}

# --- resolve the config first: a bad config fails here, exit 2, no requeue ----------------------
RESOLVED=$("$PY" -m megatron_lomdm.train "$@" --print-config) || { rc=$?; log "bad config (exit $rc)"; exit "$rc"; }
RUN_DIR=$(printf '%s\n' "$RESOLVED" | "$PY" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["run"]["dir"])')
mkdir -p "$RUN_DIR/launch"

# --- launch record: what ran, from which code, in which job/restart -----------------------------
STAMP=$(date +%Y%m%dT%H%M%S)
RECORD="$RUN_DIR/launch/${STAMP}-job${SLURM_JOB_ID:-none}-r${SLURM_RESTART_COUNT:-0}.txt"
GIT_REV=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$GIT_REV" != unknown ] && ! git -C "$ROOT" diff --quiet HEAD 2>/dev/null; then
    GIT_REV="$GIT_REV+dirty"
    git -C "$ROOT" diff HEAD > "${RECORD%.txt}.patch" 2>/dev/null || true
fi
{
    echo "launcher: slurm/train.sh"
    echo "time: $(date -Iseconds)"
    echo "host: $(hostname)"
    echo "job_id: ${SLURM_JOB_ID:-}"
    echo "restart_count: ${SLURM_RESTART_COUNT:-0}"
    echo "nodes: ${SLURM_JOB_NODELIST:-}"
    echo "ntasks: ${SLURM_NTASKS:-1}"
    echo "git_rev: $GIT_REV"
    echo "python: $PY"
    printf 'args:'; printf ' %q' "$@"; echo
    echo "--- resolved config ---"
    printf '%s\n' "$RESOLVED"
} > "$RECORD"
log "run dir $RUN_DIR (record $RECORD)"

if [ -n "$GOT_SIGNAL" ]; then requeue; exit 3; fi  # signalled before training even started

# --- rendezvous: rank 0 lives on the first node; the port is derived from the job id -------------
# (stable across a requeue, different for concurrent jobs on one node; override with MASTER_PORT)
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
export MASTER_ADDR=${MASTER_ADDR:-localhost}
export MASTER_PORT=${MASTER_PORT:-$(( 15000 + ${SLURM_JOB_ID:-0} % 20000 ))}

# --- one task per GPU / CPU process -------------------------------------------------------------
# Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch: pass it on explicitly.
# No --kill-on-bad-exit: a rank that exits 3 after the checkpoint barrier must not kill the others.
SRUN_ARGS=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
# Extra srun flags, e.g. a pyxis container: LOMDM_SRUN_ARGS="--container-image=... --container-mounts=..."
# shellcheck disable=SC2206  # word splitting is the point
if [ -n "${LOMDM_SRUN_ARGS:-}" ]; then SRUN_ARGS+=(${LOMDM_SRUN_ARGS}); fi
log "srun ${SLURM_NTASKS:-1} task(s), master $MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}"
# shellcheck disable=SC2016  # expanded inside each task
srun "${SRUN_ARGS[@]}" bash -c '
    export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
    exec "$0" -m megatron_lomdm.train "$@"' "$PY" "$@" &
SRUN_PID=$!
if [ -n "$GOT_SIGNAL" ]; then forward "$GOT_SIGNAL"; fi  # arrived between the fork and now

# `wait` returns early (>128) whenever a trapped signal arrives: wait again until srun is gone.
wait "$SRUN_PID"; rc=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; rc=$?; done
log "training step exited with $rc"

if [ "$rc" -eq 3 ] || { [ -n "$GOT_SIGNAL" ] && [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; }; then
    requeue
    exit 3
fi
exit "$rc"
