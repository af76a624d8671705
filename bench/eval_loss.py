"""Evaluation's loss path: per-example losses before and after the flat layout (issue 14).

Every task's `eval_step` turns the model's logits into per-example summed losses. Until
issue 14 that was `cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")`:
a full fp32 copy of the logits (when they are bf16/fp16), reduced over a strided vocabulary
dimension. Now the logits are read in their flat (rows x vocab) layout a chunk of rows at a
time (`notrainer.modeling.losses.per_token_losses`), and with `chunked_loss` the causal-LM tasks never
build the whole logits at all (`per_token_linear_losses` on the last hidden state).

Three paths, timed on the same model and batches in one process, alternating, several repeats:

    today     the old eval_step: full logits, the transposed fp32 cross-entropy
    flat      eval_step now (chunked_loss=false): full logits, flat layout, fp32 a chunk at a time
    chunked   eval_step with chunked_loss=true: hidden states, the head a chunk of rows at a time

Two setups: `clm-default` (the embedded default of task=clm: tiny GPT-2, its built-in data and
tokenizer, eval batch 16 x 64, the whole validation split) and `gpt2-124m` (GPT-2 124M shape
from its config, random init, random tokens, seq 512). Prints ms per batch for the whole
eval step (forward + loss) and for the loss part alone (from the same logits / hidden states),
and the ratio against `today`. On a CPU the times are process CPU time (robust to other load on
the machine) with wall time beside; on a GPU, synchronised wall time and peak memory.

    python bench/eval_loss.py                              # both setups, 1 thread, fp32
    python bench/eval_loss.py --setups gpt2-124m --batches 3 --batch 4 --seq 512
    python bench/eval_loss.py --dtype bf16                 # bf16 logits: today also copies them to fp32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from notrainer.modeling import losses  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def today_token_losses(logits, labels):
    """tasks/base.py token_losses(shift=True) before issue 14, verbatim in effect."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(1)
    return {"loss": loss, "num_items": (labels != -100).sum(1)}


# ---------------------------------------------------------------------- setups


def clm_default(args):
    """The task=clm embedded default as the CLI builds it: (task, model, batches)."""
    from accelerate.utils import set_seed

    from notrainer.cli.run import parse_args

    cfg, task_cls = parse_args(["task=clm", "chunked_loss=true", "report_to=none"])
    set_seed(cfg.seed)
    task = task_cls(cfg)
    raw = task.load_raw_datasets()
    tokenizer = task.build_tokenizer(raw)
    model = task.build_model(tokenizer)
    task.setup(model, tokenizer)
    ds = task.prepare_datasets(raw, tokenizer)["validation"]
    collate = task.collator(tokenizer)
    size = cfg.per_device_eval_batch_size
    batches = [collate([ds[j] for j in range(i, min(i + size, len(ds)))]) for i in range(0, len(ds), size)]
    return task, model, batches, f"tiny gpt2, {len(ds)} blocks of {cfg.block_size}, eval batch {size}"


def gpt2_124m(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    from notrainer.tasks.clm import CLMConfig, CLMTask

    torch.manual_seed(0)
    config = GPT2Config(n_positions=max(1024, args.seq))  # 124M: 12 layers, 768 wide, 50,257 tokens
    model = GPT2LMHeadModel(config)
    task = CLMTask(CLMConfig(chunked_loss=True, report_to="none"))
    task._head = task.chunked_loss_head(model)  # what setup does (no tokenizer needed here)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    n = sum(p.numel() for p in model.parameters())
    return task, model, batches, f"GPT-2 shape, {n / 1e6:.0f}M params, {args.batches} batches of {args.batch} x {args.seq}"


SETUPS = {"clm-default": clm_default, "gpt2-124m": gpt2_124m}


# ---------------------------------------------------------------------- timing


class Clock:
    def __init__(self):
        self.cuda = torch.cuda.is_available()

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.process_time(), time.perf_counter()


def run_setup(name, args, device, dtype):
    task, model, batches, what = SETUPS[name](args)
    model.to(device=device, dtype=dtype).eval()
    batches = [{k: torch.as_tensor(v).to(device) for k, v in b.items()} for b in batches]
    head = task._head

    def forward_logits(b):  # the head is off outside hidden_states_from: full logits
        return model(**{k: v for k, v in b.items() if k != "labels"}).logits

    def forward_hidden(b):
        with losses.hidden_states_from(head):
            return model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False).logits

    def today(b):
        return today_token_losses(forward_logits(b), b["labels"])

    def flat(b):
        task._head = None
        try:
            return task.eval_step(model, b)
        finally:
            task._head = head

    def chunked(b):
        return task.eval_step(model, b)

    paths = {"today": today, "flat": flat, "chunked": chunked}
    # The loss part alone, from the same logits / hidden states (computed once, outside the clock).
    with torch.no_grad():
        cached_logits = [forward_logits(b) for b in batches]
        cached_hidden = [forward_hidden(b) for b in batches]
    loss_parts = {
        "today": lambda i: today_token_losses(cached_logits[i], batches[i]["labels"]),
        "flat": lambda i: losses.per_example(losses.per_token_losses(cached_logits[i],
                                                                     losses.shift_labels(batches[i]["labels"])),
                                             losses.shift_labels(batches[i]["labels"])),
        # includes the head's matmul, which the other two got from the forward: compare with the
        # full step for the fair figure
        "chunked": lambda i: losses.token_losses(cached_hidden[i], head.weight, losses.shift_labels(batches[i]["labels"]),
                                                 bias=head.bias),
    }

    # Same numbers first (the point of the change), then the clock.
    with torch.no_grad():
        ref = [today(b) for b in batches]
        for p in ("flat", "chunked"):
            for r, b in zip(ref, batches):
                got = paths[p](b)
                assert torch.equal(got["num_items"], r["num_items"])
                torch.testing.assert_close(got["loss"].float(), r["loss"].float(), rtol=1e-4 if dtype == torch.float32 else 2e-2,
                                           atol=1e-3)

    clock = Clock()
    step_cpu = {p: [] for p in paths}
    step_wall = {p: [] for p in paths}
    loss_cpu = {p: [] for p in paths}
    loss_wall = {p: [] for p in paths}
    peak = {}
    order = list(paths)
    with torch.no_grad():
        for r in range(args.repeats):
            for p in (order if r % 2 == 0 else order[::-1]):  # alternate: background load hits all alike
                if clock.cuda:
                    torch.cuda.reset_peak_memory_stats()
                c0, w0 = clock.now()
                for b in batches:
                    paths[p](b)
                c1, w1 = clock.now()
                if clock.cuda:
                    peak[p] = torch.cuda.max_memory_allocated() / 2**30
                step_cpu[p].append((c1 - c0) / len(batches) * 1e3)
                step_wall[p].append((w1 - w0) / len(batches) * 1e3)
                c0, w0 = clock.now()
                for i in range(len(batches)):
                    loss_parts[p](i)
                c1, w1 = clock.now()
                loss_cpu[p].append((c1 - c0) / len(batches) * 1e3)
                loss_wall[p].append((w1 - w0) / len(batches) * 1e3)
    med = statistics.median
    main_step, main_loss = (step_wall, loss_wall) if clock.cuda else (step_cpu, loss_cpu)
    rows = []
    for p in paths:
        rows.append(dict(setup=name, path=p, step_ms=med(main_step[p]), step_wall_ms=med(step_wall[p]),
                         step_ratio=med(main_step[p]) / med(main_step["today"]), loss_ms=med(main_loss[p]),
                         loss_ratio=med(main_loss[p]) / med(main_loss["today"]), peak_gib=peak.get(p)))
    return what, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="clm-default,gpt2-124m")
    ap.add_argument("--batches", type=int, default=3, help="gpt2-124m: eval batches")
    ap.add_argument("--batch", type=int, default=4, help="gpt2-124m: batch size")
    ap.add_argument("--seq", type=int, default=512, help="gpt2-124m: sequence length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model (and logits) dtype")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unit = "synchronised wall" if device == "cuda" else "process CPU"
    print(f"device {device}, {args.dtype}, {args.threads} thread(s), median of {args.repeats} repeats; "
          f"ms per batch ({unit} time)")
    header = f"{'setup':<12} {'path':<8} {'eval step ms':>12} {'ratio':>6} {'(wall ms)':>10} {'loss part ms':>12} {'ratio':>6}"
    if device == "cuda":
        header += f" {'peak GiB':>8}"
    for name in args.setups.split(","):
        what, rows = run_setup(name, args, device, DTYPES[args.dtype])
        print(f"\n{name}: {what}")
        print(header)
        for r in rows:
            line = (f"{r['setup']:<12} {r['path']:<8} {r['step_ms']:>12.1f} {r['step_ratio']:>6.2f} "
                    f"{r['step_wall_ms']:>10.1f} {r['loss_ms']:>12.1f} {r['loss_ratio']:>6.2f}")
            if r["peak_gib"] is not None:
                line += f" {r['peak_gib']:>8.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
