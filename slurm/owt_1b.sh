#!/bin/bash
# LoMDM 1B on OpenWebText (configs/experiments/owt_1b.yaml): 4 nodes x 8 GPUs, TP=1 x DP=32,
# ZeRO-1 distributed optimizer, global batch 512 = micro 8 x DP 32 x 2 accumulation steps
# (the fastest layout that fits, per `python tools/plan.py --config configs/experiments/owt_1b.yaml`;
# docs/scaling.md). With other --nodes keep TP=1: DP = 8 x nodes must divide 512 / 8.
# Signal 300 s before the limit: a 1B checkpoint with optimizer state is ~15-20 GB to write.
#
#   sbatch slurm/owt_1b.sh [dotted.key=value ...]          (from the repository root)
#   sbatch -p PARTITION -A ACCOUNT slurm/owt_1b.sh         (or SBATCH_PARTITION / SBATCH_ACCOUNT)
#
# Resources below are for 8-GPU nodes; change --nodes (data-parallel width), --gpus-per-node and
# --ntasks-per-node together (one task per GPU), --cpus-per-task to your CPUs per GPU, --time to
# your partition's limit. The run resumes from run.dir (runs/owt_1b) after every requeue; sbatch
# options on the command line override the ones here. Everything else: slurm/train.sh.
#SBATCH --job-name=lomdm-owt-1b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

# sbatch ran a copy of this file from its spool: find the repository from the submit directory.
ROOT=${LOMDM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$ROOT/slurm/train.sh" ]; then
    echo "slurm/owt_1b.sh: submit from the repository root or set LOMDM_ROOT (tried $ROOT)" >&2
    exit 2
fi
export LOMDM_ROOT=$ROOT
exec bash "$ROOT/slurm/train.sh" --config "$ROOT/configs/experiments/owt_1b.yaml" "$@"
