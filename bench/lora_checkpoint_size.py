"""Checkpoint size of a LoRA run, full (before issue 14) against adapter-only (now).

A GPT-2 124M-shaped model (transformers' GPT2Config defaults, random init, built from the
config on CPU) with lora.r=8 on task=clm's built-in data: two optimizer steps, a checkpoint at
step 2. Run twice: once as notrainer does now (adapter-only checkpoints,
notrainer/modeling/adapter_checkpoints.py) and once with its accelerate hooks left out, which is what a
checkpoint held before. Prints each checkpoint's files and sizes and the time its save took.

    OMP_NUM_THREADS=1 python bench/lora_checkpoint_size.py [--rank 8] [--out runs/bench-lora-ckpt]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from unittest import mock


def _run(out: str, config_dir: str, rank: int) -> float:
    """Runs the CLI; returns the seconds the checkpoint save took."""
    from notrainer.engine import checkpoint
    from notrainer.cli.run import run

    timed, save = [], checkpoint.save

    def timed_save(*args, **kwargs):
        start = time.perf_counter()
        try:
            return save(*args, **kwargs)
        finally:
            timed.append(time.perf_counter() - start)

    with mock.patch.object(checkpoint, "save", timed_save):
        _cli(run, out, config_dir, rank)
    return sum(timed)


def _cli(run, out: str, config_dir: str, rank: int) -> None:
    run(["task=clm", f"config_name={config_dir}", f"lora.r={rank}", "max_train_steps=2", "checkpointing_steps=2",
         "per_device_train_batch_size=2", "block_size=128", "do_eval=false",
         "report_to=none", "progress=false", f"output_dir={out}"])


def _sizes(folder: str) -> dict[str, int]:
    return {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default="runs/bench-lora-ckpt")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from transformers import GPT2Config

    shutil.rmtree(args.out, ignore_errors=True)
    config_dir = os.path.join(args.out, "gpt2-124m-config")
    GPT2Config().save_pretrained(config_dir)
    results = {}
    for label in ("full (before)", "adapter-only (now)"):
        out = os.path.join(args.out, label.split()[0])
        if label.startswith("full"):
            with mock.patch("notrainer.modeling.adapter_checkpoints.register", lambda acc, identity: None):
                seconds = _run(out, config_dir, args.rank)
        else:
            seconds = _run(out, config_dir, args.rank)
        AcceleratorState._reset_state(True)  # the next run builds a fresh accelerator
        GradientState._reset_state()
        PartialState._reset_state()
        sizes = _sizes(os.path.join(out, "checkpoints", "step_2"))
        results[label] = sizes
        print(f"\n{label}: checkpoint saved in {seconds:.2f} s, {sum(sizes.values()) / 2**20:.2f} MiB")
        for name, size in sizes.items():
            print(f"  {name:<28} {size:>14,d} bytes")
    full, adapter = (sum(s.values()) for s in results.values())
    print(f"\nadapter-only / full: {adapter / full:.4f} ({full / adapter:.0f}x smaller)")


if __name__ == "__main__":
    main()
