#!/bin/bash
# Multi-node DDP under SLURM: one `accelerate launch` per node, which starts one process per GPU.
#   sbatch launch/slurm_multi_node.sh config=run.yaml     (keys after the script go to notrainer)
# Requeue-safe: resume_from_checkpoint=auto continues from the newest complete checkpoint (a
# fresh output_dir starts from scratch). Five minutes before the time limit SLURM sends SIGUSR1
# to this script, which passes it to the ranks: notrainer finishes the step, writes a
# checkpoint and exits with status 75. The launcher itself then exits with 1, so the script
# requeues on the signal it received, not on the launcher's status (docs/checkpointing.md).
#SBATCH --job-name=notrainer
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append

set -euo pipefail
GPUS_PER_NODE=8
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
OUTPUT_DIR=${OUTPUT_DIR:-runs/$SLURM_JOB_NAME}

# torchrun (inside accelerate launch) forwards these signals to the ranks and waits for them.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGUSR1
export PET_SHUTDOWN_TIMEOUT=240
requeue=0
trap 'requeue=1; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1

# Single quotes: SLURM_NODEID must be expanded on each node, not here.
status=0
srun --kill-on-bad-exit=1 bash -c 'accelerate launch --config_file launch/multi_node.yaml \
    --num_machines "$SLURM_NNODES" --num_processes $(( SLURM_NNODES * '"$GPUS_PER_NODE"' )) \
    --machine_rank "$SLURM_NODEID" --main_process_ip '"$HEAD_NODE"' --main_process_port 29500 \
    -m notrainer.run output_dir='"$OUTPUT_DIR"' resume_from_checkpoint=auto "$@"' _ "$@" &
wait $! || status=$?   # returns early when the trap runs...
wait || status=$?      # ...then waits for the ranks to checkpoint and exit

# The time limit is near (or a single-process run exited 75): queue the job again.
if [ "$requeue" = 1 ] || [ "$status" -eq 75 ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
