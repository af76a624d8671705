"""Training throughput: notrainer against the HF Trainer and a plain Accelerate loop.

One invocation trains the same randomly initialised model on the same random tokens, with the
same per-device batch and sequence length, with each contender in turn:

    notrainer          Loop + the CLI's defaults (fused AdamW on CUDA; chunked loss on CUDA)
    notrainer-fast     the recommended fast setting: + torch_compile=true, chunked_loss=true,
                       max_nonfinite_steps=0 (no per-step host sync)
    trainer            transformers.Trainer with its defaults
    trainer-compile    transformers.Trainer with torch_compile=True
    accelerate         the plain loop of the HF run_clm_no_trainer.py script

and prints tokens/s, MFU, peak memory and each contender's ratio against both Trainers.
Warm-up steps (compilation, allocator) are not timed. Mixed precision is bf16 on a GPU and
fp32 on a CPU for every contender (--precision to change).

    python bench/throughput.py --model tiny                    # CPU, a few minutes
    python bench/throughput.py --model gpt2                    # GPT-2 124M, seq 1024, batch 16
    python bench/throughput.py --model qwen2-0.5b              # Qwen2-0.5B shape, seq 2048, batch 8
    python bench/throughput.py --model gpt2 --only notrainer-fast --profile   # top kernels
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CONTENDERS = ("notrainer", "notrainer-fast", "trainer", "trainer-compile", "accelerate")

# name -> (model_type, config kwargs, seq, batch)
MODELS = {
    "tiny": ("gpt2", dict(n_layer=2, n_embd=128, n_head=4, vocab_size=4096, n_positions=128), 128, 8),
    "gpt2": ("gpt2", dict(), 1024, 16),  # GPT-2 small, 124M
    "qwen2-0.5b": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True), 2048, 8),
}


def build_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs, _, _ = MODELS[args.model]
    config = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, **kwargs)
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def random_tokens(args, n_rows: int):
    """Rows of random token ids (labels = inputs, no padding) as a torch-formatted Dataset."""
    import datasets

    vocab = MODELS[args.model][1].get("vocab_size", 50257)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, vocab, (n_rows, args.seq), generator=g)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                     "labels": ids.tolist()})
    ds.set_format("torch")
    return ds


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """Times optimizer steps warmup+1 .. warmup+steps (end of step to end of step)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.t0, self.t1, self.done = warmup, steps, None, None, 0
        self.c0 = self.c1 = None

    def step_end(self) -> None:
        self.done += 1
        if self.done == self.warmup:
            sync()
            self.t0, self.c0 = time.perf_counter(), time.process_time()
        elif self.done == self.warmup + self.steps:
            sync()
            self.t1, self.c1 = time.perf_counter(), time.process_time()

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0

    @property
    def cpu_seconds(self) -> float:
        """Process CPU time (all threads): on a shared CPU, the work itself, not the waiting."""
        return self.c1 - self.c0


def reset_accelerate() -> None:
    """accelerate's state is a process-wide singleton; each contender starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()


# ---------------------------------------------------------------------- contenders


def run_notrainer(args, ds, clock: StepClock, fast: bool) -> float:
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    from notrainer import Loop
    from notrainer.engine.loop import make_accelerator
    from notrainer.modeling.optim import build_optimizer, scheduler_factory
    from notrainer.tasks.clm import CLMConfig, CLMTask

    out = tempfile.mkdtemp(prefix="bench-notrainer-")
    # What the CLI does with `task=clm mixed_precision=... [torch_compile=true chunked_loss=true]`.
    cfg = CLMConfig(output_dir=out, mixed_precision=args.precision, learning_rate=3e-4,
                    torch_compile=fast, torch_compile_mode=args.compile_mode if fast else None,
                    chunked_loss=True if fast else None, report_to="none",
                    # fast: no per-step host sync for the non-finite guard (the Trainer has none either)
                    max_nonfinite_steps=0 if fast else CLMConfig.max_nonfinite_steps)
    acc = make_accelerator(cfg)
    task = CLMTask(cfg)
    model = build_model(args)
    task._head = task.chunked_loss_head(model)
    if not args.keep_mask:  # task=clm's packed blocks carry no all-ones attention_mask (docs/performance.md)
        ds = ds.remove_columns("attention_mask")
    loader = DataLoader(ds, batch_size=args.batch, shuffle=True, collate_fn=default_data_collator,
                        pin_memory=torch.cuda.is_available())
    loop = Loop(model, build_optimizer(model, cfg, acc.device), loader, loss_fn=task.loss,
                scheduler=scheduler_factory(cfg), num_items_fn=task.num_items, num_tokens_fn=task.num_tokens,
                config=cfg, max_train_steps=args.warmup + args.steps, accelerator=acc, export=False, progress=False)
    train_step = loop.train_step

    def timed_step(window):
        train_step(window)
        clock.step_end()

    loop.train_step = timed_step
    loop.fit()
    return float(loop.results["train_loss"])


def run_trainer(args, ds, clock: StepClock, compile_: bool) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            clock.step_end()

    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-trainer-"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps, learning_rate=3e-4, bf16=args.precision == "bf16",
        fp16=args.precision == "fp16", torch_compile=compile_, report_to="none", save_strategy="no",
        logging_steps=10, use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=args.seed,
        **({"torch_compile_mode": args.compile_mode} if compile_ and args.compile_mode else {}),
    )
    trainer = Trainer(model=build_model(args), args=targs, train_dataset=ds, callbacks=[Clock()])
    out = trainer.train()
    return float(out.training_loss)


def run_accelerate(args, ds, clock: StepClock) -> float:
    """The loop of transformers' examples/pytorch/language-modeling/run_clm_no_trainer.py."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import default_data_collator, get_scheduler

    acc = Accelerator(mixed_precision=None if args.precision == "no" else args.precision)
    model = build_model(args)
    loader = DataLoader(ds, batch_size=args.batch, shuffle=True, collate_fn=default_data_collator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    total = args.warmup + args.steps
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total)
    model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
    model.train()
    step, losses = 0, []
    while step < total:
        for batch in loader:
            outputs = model(**batch)  # held until the next step, as in the script
            loss = outputs.loss
            losses.append(loss.detach().float())
            acc.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            clock.step_end()
            if step >= total:
                break
    return torch.stack(losses).mean().item()


def run_one(name: str, args, ds) -> dict:
    reset_accelerate()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(args.warmup, args.steps)
    try:
        if name.startswith("notrainer"):
            loss = run_notrainer(args, ds, clock, fast=name == "notrainer-fast")
        elif name.startswith("trainer"):
            loss = run_trainer(args, ds, clock, compile_=name == "trainer-compile")
        else:
            loss = run_accelerate(args, ds, clock)
    except torch.cuda.OutOfMemoryError:
        return {"name": name, "error": "out of memory"}
    tokens = args.steps * args.batch * args.seq
    row = {"name": name, "tokens_per_second": tokens / clock.seconds, "train_loss": loss,
           "step_ms": clock.seconds / args.steps * 1e3, "cpu_step_ms": clock.cpu_seconds / args.steps * 1e3}
    if torch.cuda.is_available():
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def profile_fast(args, ds) -> None:
    """torch.profiler over a few steps of notrainer-fast (after its warm-up): the top kernels."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    reset_accelerate()
    prof = profile(activities=activities, schedule=schedule(wait=args.warmup, warmup=1, active=3, repeat=1))
    clock = StepClock(args.warmup, 4)
    args_p = argparse.Namespace(**{**vars(args), "steps": 4})
    step_end = clock.step_end

    def step_and_profile():
        step_end()
        prof.step()

    clock.step_end = step_and_profile
    with prof:
        run_notrainer(args_p, ds, clock, fast=True)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"\n--- notrainer-fast: top ops and kernels by {key} over 3 steps")
    print(prof.key_averages().table(sort_by=key, row_limit=args.profile_rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--batch", type=int, help="per-device batch (default: per model)")
    p.add_argument("--seq", type=int, help="sequence length (default: per model)")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default: 50 on GPU, 10 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 10 on GPU, 3 on CPU)")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], help="default: bf16 on GPU, no on CPU")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the compiled contenders")
    p.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    p.add_argument("--peak-tflops", type=float, help="peak for MFU (default: from the GPU's name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on a CPU, where the table also gives "
                                                "process CPU time: robust to other load on the machine)")
    p.add_argument("--keep-mask", action="store_true",
                   help="give notrainer the all-ones attention_mask too (task=clm drops it from packed blocks)")
    p.add_argument("--profile", action="store_true", help="also profile notrainer-fast and print the top ops")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    _, _, seq, batch = MODELS[args.model]
    args.seq, args.batch = args.seq or seq, args.batch or batch
    args.steps = args.steps or (50 if gpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 3)
    args.precision = args.precision or ("bf16" if gpu else "no")
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in CONTENDERS:
            p.error(f"unknown contender {n!r}; choose from {', '.join(CONTENDERS)}")

    from transformers.utils import logging as hf_logging

    from notrainer.observability import throughput

    hf_logging.set_verbosity_error()
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # what a fp32 run on Ampere+ would use anyway
        torch.backends.cudnn.allow_tf32 = True
    ds = random_tokens(args, args.batch * (args.warmup + args.steps + 1))
    with torch.device("meta"):
        meta = build_model(args)
    fpt = throughput.flops_per_token(meta, args.seq)
    n_params = sum(p.numel() for p in meta.parameters())
    peak = args.peak_tflops or throughput.device_peak_tflops()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model={args.model} ({n_params / 1e6:.1f}M params, {fpt / 1e9:.3f} GFLOP/token) seq={args.seq} "
          f"batch={args.batch} precision={args.precision} steps={args.steps} (+{args.warmup} warm-up) "
          f"device={device} peak={peak or 'n/a'} TFLOP/s torch={torch.__version__}", flush=True)

    rows = []
    for name in names:
        t0 = time.perf_counter()
        row = run_one(name, args, ds)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {name}: " + (row["error"] if "error" in row else
                               f"{row['tokens_per_second']:,.0f} tok/s, {row['step_ms']:.1f} ms/step "
                               f"(process CPU {row['cpu_step_ms']:.1f} ms/step), loss {row['train_loss']:.3f}"),
              flush=True)

    base = {r["name"]: r["tokens_per_second"] for r in rows if "tokens_per_second" in r}
    mem = {r["name"]: r.get("peak_memory_gib") for r in rows}
    # On a CPU, rates and ratios come from process CPU time (1 thread: the work itself, not the
    # waiting for a shared machine); on a GPU from synchronised wall time.
    if not gpu:
        for r in rows:
            if "cpu_step_ms" in r:
                r["wall_tokens_per_second"] = r["tokens_per_second"]
                r["tokens_per_second"] = args.batch * args.seq / (r["cpu_step_ms"] / 1e3)
        base = {r["name"]: r["tokens_per_second"] for r in rows if "tokens_per_second" in r}
    clock = "wall" if gpu else "cpu"
    header = f"| {'contender':<16} | {'tokens/s':>10} | {clock + ' ms/step':>12} | {'MFU':>6} | {'peak GiB':>8} | " \
             f"{'vs trainer':>10} | {'vs trainer-compile':>18} | {'mem vs trainer-compile':>22} |"
    print("\n" + header + "\n|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']:<16} | {r['error']:>10} | {'':>12} | {'':>6} | {'':>8} | {'':>10} | {'':>18} | {'':>22} |")
            continue
        tps = r["tokens_per_second"]
        r["mfu"] = throughput.mfu(tps, fpt, peak) if peak else None
        vs = {k: (tps / base[k] if k in base else None) for k in ("trainer", "trainer-compile")}
        mem_ratio = (r["peak_memory_gib"] / mem["trainer-compile"]
                     if r.get("peak_memory_gib") and mem.get("trainer-compile") else None)
        r.update(vs_trainer=vs["trainer"], vs_trainer_compile=vs["trainer-compile"], mem_vs_trainer_compile=mem_ratio)
        f = lambda x, fmt: format(x, fmt) if x is not None and not (isinstance(x, float) and math.isnan(x)) else "-"  # noqa: E731
        step_ms = r["step_ms"] if gpu else r["cpu_step_ms"]
        print(f"| {r['name']:<16} | {tps:>10,.0f} | {step_ms:>12.1f} | {f(r['mfu'], '.1%'):>6} | "
              f"{f(r.get('peak_memory_gib'), '.1f'):>8} | {f(vs['trainer'], '.2f'):>10} | "
              f"{f(vs['trainer-compile'], '.2f'):>18} | {f(mem_ratio, '.2f'):>22} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "device": device, "flops_per_token": fpt, "rows": rows}, fh, indent=2)
    if args.profile:
        profile_fast(args, ds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
