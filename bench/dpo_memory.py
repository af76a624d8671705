"""Peak memory of task=dpo by reference-model choice: a frozen copy, precomputed log-probs, and a
LoRA policy whose reference is the base with the adapter disabled.

A random-init llama (hidden 512, 8 layers, vocab of the built-in tokenizer: about 27M parameters,
105 MiB in fp32; larger with --hidden/--layers) is saved to a folder; each configuration then runs
a few optimizer steps of task=dpo on the built-in pairs in its own fresh process, which reports
its peak memory: on CUDA `torch.cuda.max_memory_allocated`, on a CPU the process's peak RSS
(`ru_maxrss`, which includes Python and the libraries: compare the rows, not the absolute values).

    OMP_NUM_THREADS=1 python bench/dpo_memory.py [--hidden 512 --layers 8 --steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, torch
from notrainer.cli.run import run
run(sys.argv[1:])
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("PEAK " + json.dumps({"peak_bytes": peak, "cuda": torch.cuda.is_available()}))
"""

CONFIGS = [
    ("full fine-tune, frozen copy", []),
    ("full fine-tune, precompute_ref_log_probs=true", ["precompute_ref_log_probs=true"]),
    ("LoRA r=8, base with adapter disabled", ["lora.r=8"]),
    ("LoRA r=8, frozen copy (forced)", ["lora.r=8", "task=bench/dpo_memory.py:CopyReferenceDPO"]),
]


def _copy_reference_task():
    from notrainer.tasks.dpo import DPOTask

    class CopyReferenceDPO(DPOTask):
        """The LoRA policy with a frozen copy as its reference, as it would be without the adapter trick."""

        def setup(self, model, tokenizer):
            super().setup(model, tokenizer)
            if self._reference == "adapter":
                import copy

                self._reference, self._ref_model = "copy", copy.deepcopy(model).eval().requires_grad_(False)

    return CopyReferenceDPO


def __getattr__(name):  # task=bench/dpo_memory.py:CopyReferenceDPO
    if name == "CopyReferenceDPO":
        return _copy_reference_task()
    raise AttributeError(name)


def build_model(folder: str, hidden: int, layers: int) -> int:
    from transformers import AutoModelForCausalLM

    from notrainer.data.builtin import tiny_config, train_tokenizer
    from notrainer.tasks.preference import builtin_preferences

    train, _ = builtin_preferences()
    tok = train_tokenizer([r[k] for r in train for k in ("prompt", "chosen", "rejected")], style="gpt")
    config = tiny_config("llama", tok, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        n = build_model(folder, args.hidden, args.layers)
        print(f"model: llama, {n / 1e6:.1f}M parameters ({n * 4 / 2**20:.0f} MiB in fp32); {args.steps} steps, "
              "batch 8 pairs, max_length 32")
        rows = []
        for label, extra in CONFIGS:
            argv = ["task=dpo", f"model_name_or_path={folder}", f"max_train_steps={args.steps}", "do_eval=false",
                    "per_device_train_batch_size=8", "report_to=none", f"output_dir={os.path.join(tmp, str(len(rows)))}",
                    *extra]
            proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, cwd=repo,
                                  env={**os.environ, "PYTHONPATH": repo})
            line = [x for x in proc.stdout.splitlines() if x.startswith("PEAK ")]
            if proc.returncode != 0 or not line:
                print(f"{label}: failed\n{proc.stderr[-2000:]}")
                continue
            info = json.loads(line[-1][5:])
            rows.append((label, info["peak_bytes"] / 2**20, info["cuda"]))
        kind = "peak CUDA memory" if rows and rows[0][2] else "peak RSS"
        print(f"\n| configuration | {kind} (MiB) |\n|---|---|")
        for label, mib, _ in rows:
            print(f"| {label} | {mib:.0f} |")


if __name__ == "__main__":
    main()
