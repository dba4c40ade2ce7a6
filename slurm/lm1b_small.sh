#!/bin/bash
# The paper's LM1B setting, MDLM-small backbone (configs/experiments/lm1b_small.yaml): one node x 8
# GPUs, DP=8, global batch 512 = micro 64 x DP 8 (no accumulation).
#
#   sbatch slurm/lm1b_small.sh [dotted.key=value ...]          (from the repository root)
#   sbatch -p PARTITION -A ACCOUNT slurm/lm1b_small.sh         (or SBATCH_PARTITION / SBATCH_ACCOUNT)
#
# Resources below are for 8-GPU nodes; change --nodes (data-parallel width), --gpus-per-node and
# --ntasks-per-node together (one task per GPU), --cpus-per-task to your CPUs per GPU, --time to
# your partition's limit. The run resumes from run.dir (runs/lm1b_small) after every requeue; sbatch
# options on the command line override the ones here. Everything else: slurm/train.sh.
#SBATCH --job-name=lomdm-lm1b-small
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# sbatch ran a copy of this file from its spool: find the repository from the submit directory.
ROOT=${LOMDM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$ROOT/slurm/train.sh" ]; then
    echo "slurm/lm1b_small.sh: submit from the repository root or set LOMDM_ROOT (tried $ROOT)" >&2
    exit 2
fi
export LOMDM_ROOT=$ROOT
exec bash "$ROOT/slurm/train.sh" --config "$ROOT/configs/experiments/lm1b_small.yaml" "$@"
