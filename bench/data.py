"""The streaming data pipeline: throughput against the bare tokenizer, memory and start-up time
against the corpus size.

    python bench/data.py                      # 50 MB and 500 MB corpora (20 .jsonl.zst shards each)
    python bench/data.py --mb 10 --scale 10   # smaller, quicker
    python bench/data.py --json out.json

(1) Throughput. The same tokenizer (a byte-level BPE trained here, fast/Rust) tokenizes the
    same documents twice in one run: bare (`tokenizer(batch of 1000 texts)` on documents already
    in memory) and through the streaming pipeline (`notrainer.data.streaming`: read and decompress
    the shards, parse JSON lines, tokenize, pack into blocks, collate batches; DataLoader with
    0, 1 and 2 workers). Both count the same tokens (the ids before packing) per second of wall
    time. The tokenizer runs single-threaded (TOKENIZERS_PARALLELISM=false), so one worker is
    compared with one core.
(2) Memory and start-up. A short `task=clm streaming=true` CLI run on the 1x and the 10x corpus
    (same settings, 2 workers): the peak RSS of its process tree (sampled every 50 ms), and the
    time from the process start until the first optimizer step's checkpoint is complete
    (checkpointing_steps=1: an upper bound on the time to the first step).

Corpora are generated under a temporary folder and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARDS = 20


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Documents of 50-400 words from a 5000-word pseudo-vocabulary (Zipf-like frequencies)."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choice(letters[:12 + i % 14]) for _ in range(rng.randint(2, 9))) for i in range(5000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]
    docs = []
    for _ in range(n):
        words = rng.choices(vocab, weights, k=rng.randint(50, 400))
        docs.append(" ".join(words).capitalize() + ".")
    return docs


def write_corpus(folder: str, docs: list[str], megabytes: float, seed: int = 0) -> int:
    """SHARDS .jsonl.zst shards holding about `megabytes` MB of text (documents drawn from
    `docs`); returns the number of documents."""
    import zstandard

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    per_shard = megabytes * 1e6 / SHARDS
    count = 0
    for s in range(SHARDS):
        size, lines = 0, []
        while size < per_shard:
            doc = rng.choice(docs)
            lines.append(json.dumps({"text": doc}))
            size += len(doc)
        count += len(lines)
        data = ("\n".join(lines) + "\n").encode()
        with open(os.path.join(folder, f"train-{s:05d}.jsonl.zst"), "wb") as f:
            f.write(zstandard.ZstdCompressor(level=3).compress(data))
    return count


def build_tokenizer(docs: list[str]):
    from notrainer.data.builtin import train_tokenizer

    return train_tokenizer(docs[:2000], vocab_size=8000, style="gpt")


def bare_throughput(tokenizer, docs: list[str], min_tokens: int) -> float:
    """Tokens/s of the very call the pipeline makes, `tokenizer(texts + eos, no attention mask)`,
    on documents in memory, batches of 1000 (the pipeline's group)."""
    tokens, start = 0, time.perf_counter()
    i = 0
    while tokens < min_tokens:
        batch = [docs[(i + k) % len(docs)] + tokenizer.eos_token for k in range(1000)]
        i += 1000
        tokens += sum(len(ids) for ids in tokenizer(batch, return_attention_mask=False)["input_ids"])
    return tokens / (time.perf_counter() - start)


def pipeline_throughput(tokenizer, folder: str, workers: int, min_tokens: int, block_size: int = 1024,
                        batch_size: int = 8) -> tuple[float, float]:
    """(tokens/s, seconds to the first batch) of read -> decompress -> parse -> tokenize ->
    pack -> collate, through the DataLoader the CLI uses."""
    from transformers import default_data_collator

    from notrainer.data.streaming import build_stream, stream_loader

    stream = build_stream(folder, tokenizer, block_size=block_size)
    loader = stream_loader(stream, batch_size=batch_size, collate_fn=default_data_collator, num_workers=workers)
    start = time.perf_counter()
    tokens, first = 0, None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        tokens += batch["input_ids"].numel()
        if tokens >= min_tokens:
            break
    # packing drops each group's remainder (< one block per 1000 documents): counted as read
    return tokens / (time.perf_counter() - start), first


def run_cli(folder: str, out: str, steps: int, workers: int) -> dict:
    """Peak RSS (MB, process tree) and seconds to the first optimizer step of a short streaming run."""
    import psutil

    cmd = [sys.executable, "-m", "notrainer.run", "task=clm", "streaming=true", f"train_file={folder}",
           f"max_train_steps={steps}", "checkpointing_steps=1", "save_total_limit=1", "do_eval=false",
           f"dataloader_num_workers={workers}", "shuffle_buffer_size=1000", "report_to=none", "progress=false",
           f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    root, peak, first_step = psutil.Process(proc.pid), 0, None
    mark = os.path.join(out, "checkpoints", "step_1", "COMPLETE")
    deadline = start + 900
    while proc.poll() is None and time.perf_counter() < deadline:
        try:
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        if first_step is None and (os.path.exists(mark) or os.path.isdir(os.path.join(out, "checkpoints", "step_2"))):
            first_step = time.perf_counter() - start
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    err = proc.communicate()[1]
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the CLI run failed (exit {proc.returncode}):\n{err[-3000:]}")
    return {"peak_rss_mb": peak / 1e6, "first_step_s": first_step, "total_s": total}


def throughput_table(args, docs: list[str], folder: str, results: dict) -> None:
    tokenizer = build_tokenizer(docs)
    # The machine may be shared: the bare rate is measured before and after the pipeline and
    # the higher one is the reference (the ratios are then lower bounds).
    bare = [bare_throughput(tokenizer, docs, args.tokens)]
    rows = []
    for w in [int(x) for x in args.workers.split(",")]:
        rate, first = pipeline_throughput(tokenizer, folder, w, args.tokens)
        results["throughput"][f"pipeline_workers_{w}"] = {"tokens_per_s": rate, "first_batch_s": first}
        rows.append((w, rate, first))
    bare.append(bare_throughput(tokenizer, docs, args.tokens))
    ref = max(bare)
    results["throughput"]["bare_tokenizer"] = bare
    print(f"\n| reader | tokens/s | x bare tokenizer | first batch (s) |\n|---|---:|---:|---:|")
    print(f"| bare tokenizer (1 thread, texts in memory; before / after) | {bare[0]:,.0f} / {bare[1]:,.0f} | 1.00 | |")
    for w, rate, first in rows:
        print(f"| streaming pipeline, {w} worker(s) | {rate:,.0f} | {rate / ref:.2f} | {first:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=50, help="size of the 1x corpus in MB of text")
    ap.add_argument("--scale", type=int, default=10, help="the large corpus is this many times the 1x one")
    ap.add_argument("--tokens", type=int, default=3_000_000, help="tokens timed per throughput measurement")
    ap.add_argument("--workers", default="0,1,2", help="DataLoader workers to time the pipeline with")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of the CLI run")
    ap.add_argument("--cli-workers", type=int, default=2)
    ap.add_argument("--only", choices=["throughput", "memory"], help="run one of the two parts")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    import shutil

    results: dict = {"throughput": {}, "memory": {}}
    tmp = tempfile.mkdtemp(prefix="notrainer-bench-data-")
    try:
        t0 = time.perf_counter()
        docs = make_docs(20_000)
        small, large = os.path.join(tmp, "x1"), os.path.join(tmp, f"x{args.scale}")
        n_small = write_corpus(small, docs, args.mb, seed=1)
        n_large = write_corpus(large, docs, args.mb * args.scale, seed=2)
        on_disk = {k: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 1e6
                   for k, d in (("x1", small), (f"x{args.scale}", large))}
        print(f"corpora: {args.mb:g} MB text ({n_small} docs, {on_disk['x1']:.0f} MB zst) and "
              f"{args.mb * args.scale:g} MB ({n_large} docs, {on_disk[f'x{args.scale}']:.0f} MB zst), "
              f"{SHARDS} shards each; generated in {time.perf_counter() - t0:.0f} s", flush=True)

        if args.only != "memory":
            throughput_table(args, docs, small, results)
        if args.only == "throughput":
            return
        print(f"\n| corpus | text | peak RSS (MB) | first optimizer step (s) | run of {args.steps} steps (s) |"
              "\n|---|---:|---:|---:|---:|")
        for name, folder, mb in (("1x", small, args.mb), (f"{args.scale}x", large, args.mb * args.scale)):
            r = run_cli(folder, os.path.join(tmp, f"run-{name}"), args.steps, args.cli_workers)
            results["memory"][name] = {"text_mb": mb, **r}
            print(f"| {name} | {mb:g} MB | {r['peak_rss_mb']:,.0f} | {r['first_step_s']:.1f} | {r['total_s']:.1f} |",
                  flush=True)
        m = results["memory"]
        growth = m[f"{args.scale}x"]["peak_rss_mb"] / m["1x"]["peak_rss_mb"] - 1
        print(f"\npeak RSS growth 1x -> {args.scale}x: {growth:+.1%}")
        results["memory"]["growth"] = growth
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
