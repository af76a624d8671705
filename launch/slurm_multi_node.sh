#!/bin/bash
# Multi-node DDP under SLURM: one `accelerate launch` per node, which starts one process per GPU.
#   sbatch launch/slurm_multi_node.sh config=run.yaml     (keys after the script go to notrainer)
# Requeue-safe: resume_from_checkpoint=auto continues from the newest complete checkpoint (a
# fresh output_dir starts from scratch), and SIGUSR1 five minutes before the time limit makes
# notrainer checkpoint at the next step and exit with status 75.
#SBATCH --job-name=notrainer
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail
GPUS_PER_NODE=8
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
OUTPUT_DIR=${OUTPUT_DIR:-runs/$SLURM_JOB_NAME}

# Single quotes: SLURM_NODEID must be expanded on each node, not here.
status=0
srun --kill-on-bad-exit=1 bash -c 'accelerate launch --config_file launch/multi_node.yaml \
    --num_machines "$SLURM_NNODES" --num_processes $(( SLURM_NNODES * '"$GPUS_PER_NODE"' )) \
    --machine_rank "$SLURM_NODEID" --main_process_ip '"$HEAD_NODE"' --main_process_port 29500 \
    -m notrainer.run output_dir='"$OUTPUT_DIR"' resume_from_checkpoint=auto "$@"' _ "$@" || status=$?

# 75: notrainer checkpointed after a signal (the time limit is near): queue the job again.
if [ "$status" -eq 75 ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
