"""Throughput accounting: FLOPs per token, model FLOPs utilisation (MFU) and peak memory.

    meter = Meter(model, peak_tflops=None)      # peak looked up from the GPU's name
    meter.report(tokens=..., samples=..., seconds=..., seq_len=1024, num_processes=8)
    -> {"samples_per_second": ..., "mfu": 0.41, "peak_memory_gib": 31.2}

FLOPs per token follow the usual accounting (Kaplan et al. 2020; PaLM appendix B; nanoGPT):

    6 * N  +  12 * n_layers * seq_len * d_attn

where N counts the parameters that take part in a matrix multiply (every parameter except
embedding-table lookups; a tied lm_head is counted once, as the matmul it is), 6 = 2 FLOPs per
multiply-add x (forward + 2 x backward), and the second term is the attention scores and the
weighted sum (QK^T and AV) over the full sequence, forward and backward. Causal masking is not
discounted (the common convention, so numbers compare with published MFUs). Activation
recomputation (gradient checkpointing) is not counted: MFU counts the model's FLOPs, not the
hardware's.
"""

from __future__ import annotations

import torch


#: Dense (no sparsity) bf16/fp16 tensor-core peak, TFLOP/s, from the vendors' data sheets.
#: Matched against torch.cuda.get_device_name(); the longest matching key wins, so
#: "H100 PCIe" beats "H100". Override with the config key peak_tflops=.
PEAK_TFLOPS = {
    "B200": 2250.0,
    "B100": 1750.0,
    "H200": 989.0,
    "GH200": 989.0,
    "H100": 989.0,  # SXM
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A6000": 155.0,  # RTX A6000
    "RTX 6000 Ada": 364.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


def peak_tflops_for(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU from its name, or None when it is not in the table."""
    name = device_name.upper()
    hits = [k for k in PEAK_TFLOPS if k.upper() in name]
    return PEAK_TFLOPS[max(hits, key=len)] if hits else None


def device_peak_tflops(device: torch.device | str | None = None) -> float | None:
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return peak_tflops_for(torch.cuda.get_device_name(device))
    return None


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matrix multiply: all of them, minus embedding lookups
    (token, position, token-type tables), plus the output embedding when it is tied to the
    input table (then it *is* a matmul: the lm_head)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) not in embedding_weights:
            total += p.numel()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and id(weight) in embedding_weights:
        total += weight.numel()
    return total


def attention_shape(config) -> tuple[int, int] | None:
    """(layers, d_attn = heads x head_dim) of a transformers config, or None if it has none."""
    if config is None:
        return None
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (isinstance(layers, int) and isinstance(heads, int)):
        return None
    head_dim = getattr(config, "head_dim", None)
    if not isinstance(head_dim, int):
        if not isinstance(hidden, int):
            return None
        head_dim = hidden // heads
    return layers, heads * head_dim


def flops_per_token(model: torch.nn.Module, seq_len: int, n_params: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    n = matmul_params(model) if n_params is None else n_params
    attn = attention_shape(getattr(model, "config", None))
    attention = 12 * attn[0] * seq_len * attn[1] if attn else 0
    return 6.0 * n + attention


def mfu(tokens_per_second: float, flops_per_tok: float, peak_tflops: float, num_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' summed peak."""
    return tokens_per_second * flops_per_tok / (peak_tflops * 1e12 * num_devices)


def peak_memory_gib(device: torch.device | str | None = None) -> float | None:
    """Peak memory allocated by tensors on a CUDA device since the last reset (GiB)."""
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    device = torch.device(device) if device is not None else None
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.reset_peak_memory_stats(device)


class Meter:
    """Turns the loop's token and sample counts into samples/s, MFU and peak memory.

    The parameter count is taken once, from the unwrapped model; MFU is only reported when a
    peak is known (a GPU from the table, or `peak_tflops` given) and the model has a config
    with layers and heads (the attention term needs them; without one, 6N alone is used).
    """

    def __init__(self, model: torch.nn.Module, peak_tflops: float | None = None,
                 device: torch.device | str | None = None):
        self.model = model
        self.n_params = matmul_params(model)
        self.device = device
        self.peak_tflops = peak_tflops if peak_tflops else device_peak_tflops(device)
        self.samples = 0.0  # over every report, for the run's summary
        self.seq_len = 0

    def report(self, tokens: float, samples: float, seconds: float, seq_len: int, num_processes: int = 1) -> dict:
        """Rates over one logging window (counts summed over ranks)."""
        seconds = max(seconds, 1e-9)
        self.samples += samples
        self.seq_len = seq_len or self.seq_len
        out = {"samples_per_second": samples / seconds}
        if self.peak_tflops and tokens > 0:
            fpt = flops_per_token(self.model, self.seq_len, self.n_params)
            out["mfu"] = mfu(tokens / seconds, fpt, self.peak_tflops, num_processes)
        mem = peak_memory_gib(self.device)
        if mem is not None:
            out["peak_memory_gib"] = mem
        return out

    def summary(self, runtime: float, tokens_per_second: float, num_processes: int = 1) -> dict:
        """The run's figures for all_results.json."""
        out = {"train_samples_per_second": round(self.samples / max(runtime, 1e-9), 3)}
        if self.peak_tflops and tokens_per_second > 0:
            fpt = flops_per_token(self.model, self.seq_len, self.n_params)
            out["train_mfu"] = round(mfu(tokens_per_second, fpt, self.peak_tflops, num_processes), 6)
        mem = peak_memory_gib(self.device)
        if mem is not None:
            out["train_peak_memory_gib"] = round(mem, 3)
        return out


__all__ = ["PEAK_TFLOPS", "Meter", "device_peak_tflops", "flops_per_token", "matmul_params", "mfu",
           "peak_memory_gib", "peak_tflops_for", "reset_peak_memory"]
