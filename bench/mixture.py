"""Data mixtures: realised source proportions against the weights, and the mixture's throughput
against one source.

    python bench/mixture.py                       # 3 sources 0.5/0.3/0.2, 300 steps, 2 repeats
    python bench/mixture.py --weights 0.7,0.2,0.1 --steps 600 --repeats 3
    python bench/mixture.py --json out.json

Three sources are generated under a temporary folder (deleted afterwards): `web/`, four
.jsonl.gz shards; `code/`, two .jsonl.gz shards; `books.jsonl`, one plain JSON-lines file.
Each run is a `task=clm streaming=true` CLI run of the built-in tiny model (`--steps`
optimizer steps, `block_size` `--block`, no evaluation), as a separate process:

(1) Proportions. The mixture run's `train_source_<i>_examples` (all_results.json: blocks
    trained on per source) divided by their sum, next to the normalised weights, with the
    binomial standard deviation sqrt(w (1 - w) / n) of n seeded draws.
(2) Throughput. The same run on one source (`train_file=web/`, no mixture) and on the mixture
    alternate (single, mixture, mixture, single, ...) so that background load hits both alike;
    the median `train_samples_per_second` and `train_tokens_per_second` (training time only:
    start-up and tokenizer training are not counted) of each, and the ratio mixture/single.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_rows(path: str, docs: list[str], compress: bool) -> None:
    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(gzip.compress(data) if compress else data)


def make_sources(root: str, n_docs: int) -> list[str]:
    """web/ (4 gzip shards, half the documents), code/ (2 gzip shards, 30%), books.jsonl (20%)."""
    from notrainer.tasks.clm import builtin_corpus

    docs = builtin_corpus(n_docs, seed=11)
    a, b = n_docs // 2, n_docs * 8 // 10
    web, code, books = docs[:a], docs[a:b], docs[b:]
    for s in range(4):
        write_rows(os.path.join(root, "web", f"part-{s}.jsonl.gz"), web[s::4], compress=True)
    for s in range(2):
        write_rows(os.path.join(root, "code", f"part-{s}.jsonl.gz"), code[s::2], compress=True)
    write_rows(os.path.join(root, "books.jsonl"), books, compress=False)
    return [os.path.join(root, "web"), os.path.join(root, "code"), os.path.join(root, "books.jsonl")]


def mixture_spec(paths: list[str], weights: list[float]) -> str:
    return "train_file=[" + ", ".join(f"{{path: {p}, weight: {w:g}}}" for p, w in zip(paths, weights)) + "]"


def run_cli(train_file: str, out: str, args) -> dict:
    """One short streaming CLI run; its all_results.json."""
    cmd = [sys.executable, "-m", "notrainer.run", "task=clm", "streaming=true", train_file,
           f"max_train_steps={args.steps}", f"block_size={args.block}", f"per_device_train_batch_size={args.batch}",
           "do_eval=false", "logging_steps=50", "report_to=none", "progress=false", f"seed={args.seed}",
           f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"the CLI run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "all_results.json")) as f:
        results = json.load(f)
    results["wall_s"] = time.perf_counter() - start
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="0.5,0.3,0.2", help="weights of web, code, books (normalised)")
    ap.add_argument("--docs", type=int, default=2000, help="documents generated over the three sources")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of each run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each contender (alternating)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import shutil

    weights = [float(w) for w in args.weights.split(",")]
    if len(weights) != 3 or min(weights) <= 0:
        raise SystemExit("--weights: three positive numbers (web, code, books)")
    norm = [w / sum(weights) for w in weights]
    tmp = tempfile.mkdtemp(prefix="notrainer-bench-mixture-")
    try:
        paths = make_sources(os.path.join(tmp, "data"), args.docs)
        contenders = {"single": f"train_file={paths[0]}", "mixture": mixture_spec(paths, weights)}
        order = [name for r in range(args.repeats)
                 for name in (("single", "mixture") if r % 2 == 0 else ("mixture", "single"))]
        runs: dict[str, list[dict]] = {"single": [], "mixture": []}
        print(f"{args.repeats} x 2 runs of {args.steps} steps, batch {args.batch} x {args.block} tokens, "
              f"OMP_NUM_THREADS={args.threads}", flush=True)
        for k, name in enumerate(order):
            r = run_cli(contenders[name], os.path.join(tmp, f"run-{k}-{name}"), args)
            runs[name].append(r)
            print(f"  {name}: {r['train_samples_per_second']:.1f} samples/s, {r['train_tokens_per_second']:,.0f} "
                  f"tokens/s (run {r['wall_s']:.1f} s, training {r['train_runtime']:.1f} s)", flush=True)

        mix = runs["mixture"][0]
        examples = [mix[f"train_source_{i}_examples"] for i in range(3)]
        tokens = [mix[f"train_source_{i}_tokens"] for i in range(3)]
        n = sum(examples)
        print(f"\n| source | files | weight (normalised) | blocks trained on | realised | "
              f"(realised - weight) / sigma |\n|---|---|---:|---:|---:|---:|")
        names = ["web/ (4 x .jsonl.gz)", "code/ (2 x .jsonl.gz)", "books.jsonl (plain)"]
        proportions = []
        for i in range(3):
            got = examples[i] / n
            sigma = math.sqrt(norm[i] * (1 - norm[i]) / n)
            proportions.append({"weight": norm[i], "examples": examples[i], "tokens": tokens[i], "realised": got})
            print(f"| {i} | {names[i]} | {weights[i]:g} ({norm[i]:.3f}) | {examples[i]} | {got:.3f} | "
                  f"{(got - norm[i]) / sigma:+.2f} |")

        med = {name: {k: statistics.median(r[k] for r in rs)
                      for k in ("train_samples_per_second", "train_tokens_per_second")} for name, rs in runs.items()}
        print(f"\n| run | samples/s | tokens/s | x single source |\n|---|---:|---:|---:|")
        for name, label in (("single", "one source (web/)"), ("mixture", "mixture of 3 sources")):
            m = med[name]
            ratio = m["train_tokens_per_second"] / med["single"]["train_tokens_per_second"]
            print(f"| {label} | {m['train_samples_per_second']:.1f} | {m['train_tokens_per_second']:,.0f} | "
                  f"{ratio:.3f} |")
        print(f"\n(medians of {args.repeats} runs each; {n} blocks of {args.block} tokens per run)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"proportions": proportions, "throughput": med, "runs": runs}, f, indent=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
