"""Per-step overhead of notrainer.Loop against a bare hand-written Accelerate loop.

Same tiny GPT-2 (random init), same random token data, same AdamW, same clipping and the same
constant LR, same number of steps, in one process. The two contenders alternate (bare, loop,
loop, bare, ...) so that background load hits both alike; each repeat times a full run of
`--steps` optimizer steps and divides. Prints the median step times and `ratio loop/bare`.

    python bench/overhead.py                      # CPU, 1 thread, 7 repeats of 60 steps
    python bench/overhead.py --profile            # also: where the loop spends its host time
    python bench/overhead.py --layers 0 --embd 16 --vocab 64 --batch 1 --seq 8 --steps 300
                                                  # almost no model: the per-step overhead in us

The bare loop does what a careful hand-written loop does: forward, backward, clip, step,
zero_grad, and a `.item()` of the loss every `--logging-steps` steps (the loop logs as often).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def tiny_model(vocab: int, seq: int, seed: int = 0, layers: int = 2, embd: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=embd, n_layer=layers, n_head=4,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config)


def token_data(n: int, vocab: int, seq: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]


def make_parts(args, seed: int = 0):
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    model = tiny_model(args.vocab, args.seq, seed, args.layers, args.embd)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=torch.cuda.is_available() or None)
    data = token_data(args.steps * args.batch, args.vocab, args.seq)
    loader = DataLoader(data, batch_size=args.batch, shuffle=False, collate_fn=default_data_collator,
                        pin_memory=torch.cuda.is_available())
    return model, opt, loader


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Bare:
    """The hand-written accelerate loop every no_trainer script has."""

    def __init__(self, acc, args):
        model, opt, loader = make_parts(args)
        self.acc, self.args = acc, args
        self.model, self.opt, self.loader = acc.prepare(model, opt, loader)
        self.model.train()

    def run(self) -> None:
        acc, model, opt = self.acc, self.model, self.opt
        for step, batch in enumerate(self.loader):
            loss = model(**batch).loss
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % self.args.logging_steps == 0:
                _ = loss.item()
            del loss


class WithLoop:
    """notrainer.Loop on the same parts (fit() restarted from step 0 each repeat)."""

    def __init__(self, acc, args):
        from notrainer import Loop

        model, opt, loader = make_parts(args)
        self.loop = Loop(model, opt, loader, max_train_steps=args.steps, logging_steps=args.logging_steps,
                         max_grad_norm=1.0, output_dir=tempfile.mkdtemp(prefix="overhead-"), accelerator=acc,
                         export=False, progress=False)

    def run(self) -> None:
        from notrainer.engine.state import RunState

        self.loop.state = RunState()
        self.loop.fit()


def time_run(contender) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one run."""
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    contender.run()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def profile(contender, label: str, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        contender.run()
    print(f"\n--- {label}: top ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per timed run")
    p.add_argument("--repeats", type=int, default=7, help="timed runs of each contender (alternating)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embd", type=int, default=128)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least disturbed by other load)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of both after timing")
    args = p.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from notrainer.engine.loop import make_accelerator

    acc = make_accelerator(output_dir=tempfile.mkdtemp(prefix="overhead-"))
    bare, loop = Bare(acc, args), WithLoop(acc, args)
    time_run(bare), time_run(loop)  # warm-up: allocator, kernels, first-call costs

    wall = {"bare": [], "loop": []}
    cpu = {"bare": [], "loop": []}
    for r in range(args.repeats):
        order = [("bare", bare), ("loop", loop)] if r % 2 == 0 else [("loop", loop), ("bare", bare)]
        for name, contender in order:
            w, c = time_run(contender)
            wall[name].append(w / args.steps)
            cpu[name].append(c / args.steps)
    print(f"device={acc.device} threads={args.threads} model=gpt2 {args.layers}x{args.embd} vocab={args.vocab} "
          f"batch={args.batch} seq={args.seq} "
          f"steps={args.steps} repeats={args.repeats}")
    # On a CPU shared with other work, wall time mostly measures the neighbours; the process's
    # CPU time is what the loop itself costs. On a GPU, wall time (synchronised) is the measure.
    clocks = [("cpu", cpu), ("wall", wall)] if acc.device.type == "cpu" else [("wall", wall)]
    for clock, times in clocks:
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = [lt / bt for lt, bt in zip(times["loop"], times["bare"])]
        for name in ("bare", "loop"):
            v = times[name]
            print(f"[{clock:>4}] {name:>4}: median {med[name] * 1e3:.3f} ms/step  "
                  f"(min {min(v) * 1e3:.3f}, max {max(v) * 1e3:.3f})")
        print(f"[{clock:>4}] ratio loop/bare = {med['loop'] / med['bare']:.4f}  (per-repeat ratios: median "
              f"{statistics.median(ratios):.4f}, min {min(ratios):.4f}, max {max(ratios):.4f}); "
              f"loop - bare = {(med['loop'] - med['bare']) * 1e6:+.0f} us/step")
    if args.profile:
        profile(bare, "bare")
        profile(loop, "loop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
