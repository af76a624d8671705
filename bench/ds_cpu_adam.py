"""optimizer.step() on CPU parameters: torch's AdamW against DeepSpeed's CPU Adam.

What ZeRO-Offload runs on the CPU every optimizer step (notrainer's default there is
optim=deepspeed_cpu_adam). The same model (a stack of fp32 Linear layers, about 67M parameters by
default, with notrainer's parameter groups: weight decay on the matrices, none on the biases),
the same gradients (drawn from a seeded generator before each step, outside the timing), the
same hyperparameters, for each contender in turn:

- `torch AdamW`: torch.optim.AdamW as notrainer builds it on the CPU (optim=adamw_torch; torch's
  default implementation there, foreach);
- `torch AdamW fused`: torch.optim.AdamW(fused=True) (optim=adamw_torch_fused), if this torch has
  a CPU fused kernel;
- `DeepSpeedCPUAdam`: deepspeed.ops.adam.DeepSpeedCPUAdam(adamw_mode=True) (optim=deepspeed_cpu_adam);
- `DeepSpeed FusedAdam (CPU build)`: deepspeed.ops.adam.FusedAdam where DeepSpeed's accelerator
  is the CPU (what DeepSpeed builds for a config's own AdamW section on CPU processes).

Warm-up steps are not timed; the timed steps give the median and the fastest wall ms per
step() and the median process CPU ms (all threads; less sensitive to other load on the
machine), with the ratio of the median wall times against torch AdamW measured in the same run. After all steps each contender's parameters are
compared with torch AdamW's (max abs difference): the same update, to float rounding. DeepSpeed's
ops build (JIT, C++ compiler) on first use; the build is outside the timing and printed.

    python bench/ds_cpu_adam.py                      # 16 x Linear(2048, 2048), 3 warm-up + 10 timed steps
    python bench/ds_cpu_adam.py --threads 1 --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _model(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _grads(model: torch.nn.Module, step: int) -> None:
    """The same gradients for every contender at a given step."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2


def _contenders(include_fused: bool) -> list[tuple[str, callable]]:
    out = [("torch AdamW", lambda groups, kw: torch.optim.AdamW(groups, **kw))]
    if include_fused:
        out.append(("torch AdamW fused", lambda groups, kw: torch.optim.AdamW(groups, fused=True, **kw)))
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    except ImportError:
        print("deepspeed is not installed: only torch's optimizers run")
        return out
    out.append(("DeepSpeedCPUAdam", lambda groups, kw: DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)))
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        out.append(("DeepSpeed FusedAdam (CPU build)",
                    lambda groups, kw: FusedAdam(groups, adam_w_mode=True, **kw)))
    return out


def _fused_works() -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.ones(4)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError) as e:
        print(f"torch AdamW(fused=True) does not run on this CPU: {e}")
        return False


def run(name: str, make, args) -> dict:
    from notrainer.modeling.optim import param_groups

    model = _model(args.layers, args.width)
    kwargs = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    start = time.perf_counter()
    opt = make(param_groups(model, args.weight_decay), kwargs)
    build_s = time.perf_counter() - start
    wall, cpu = [], []
    for step in range(args.warmup + args.steps):
        _grads(model, step)
        start, start_cpu = time.perf_counter(), time.process_time()
        opt.step()
        elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if step >= args.warmup:
            wall.append(elapsed)
            cpu.append(elapsed_cpu)
    params = [p.detach().clone() for p in model.parameters()]
    return {"name": name, "ms": 1e3 * statistics.median(wall), "min_ms": 1e3 * min(wall),
            "cpu_ms": 1e3 * statistics.median(cpu), "build_s": build_s, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = the cores)")
    parser.add_argument("--json", default=None, help="also write the table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = sum(p.numel() for p in _model(args.layers, args.width).parameters())
    print(f"{args.layers} x Linear({args.width}, {args.width}): {n / 1e6:.1f}M fp32 parameters; "
          f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
          f"{args.warmup} warm-up + {args.steps} timed steps")

    results = [run(name, make, args) for name, make in _contenders(_fused_works())]
    base = results[0]
    print(f"\n| optimizer | ms/step (median) | min | CPU ms/step (median) | time / torch AdamW | speed-up | "
          f"max abs diff of params vs torch AdamW after {args.warmup + args.steps} steps | construction s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        diff = max((a - b).abs().max().item() for a, b in zip(r["params"], base["params"]))
        ratio = r["ms"] / base["ms"]
        print(f"| {r['name']} | {r['ms']:.1f} | {r['min_ms']:.1f} | {r['cpu_ms']:.1f} | {ratio:.2f} | {1 / ratio:.1f}x | "
              f"{diff:.2e} | {r['build_s']:.2f} |")
        rows.append({k: v for k, v in r.items() if k != "params"} | {"ratio": ratio, "max_abs_diff": diff})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"parameters": n, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
