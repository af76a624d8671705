"""How a task's model is loaded: weight dtype, attention kernel, k-bit quantization (QLoRA).

    accelerate launch -m notrainer.run task=sft model_name_or_path=... torch_dtype=bfloat16 \
        attn_implementation=sdpa quantization=nf4 lora.r=16

`Task.build_model` passes `pretrained_kwargs(cfg)` to `from_pretrained` and `config_kwargs(cfg)`
to `from_config`; `check_loading(cfg)` runs with the config's validation, so a request the
installed libraries cannot serve (flash-attn missing, bf16 on a GPU without it, quantization
without bitsandbytes) is one line before anything is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os

from notrainer.errors import UsageError, check

DTYPES = ("auto", "bfloat16", "float16", "float32")
#: quantization= value -> BitsAndBytesConfig arguments
QUANTIZATIONS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}
#: attention kernels that need a package of their own (transformers' name -> its availability check)
_KERNEL_PACKAGES = {
    "flash_attention_2": ("is_flash_attn_2_available", "pip install flash-attn (CUDA only)"),
    "flash_attention_3": ("is_flash_attn_3_available", "install flash-attn 3 (Hopper GPUs)"),
}


def quantization(cfg) -> str | None:
    """The requested quantization: `quantization=`, or the Trainer/TRL keys `load_in_4bit=true`
    (nf4) and `load_in_8bit=true` (int8)."""
    if getattr(cfg, "quantization", None):
        return cfg.quantization
    if getattr(cfg, "load_in_4bit", False):
        return "nf4"
    if getattr(cfg, "load_in_8bit", False):
        return "int8"
    return None


def check_loading(cfg) -> None:
    """Config-time checks of torch_dtype, attn_implementation and quantization (UsageError)."""
    dtype = cfg.torch_dtype
    check(dtype is None or dtype in DTYPES, f"torch_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "bfloat16":
        import torch

        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise UsageError(f"torch_dtype=bfloat16: this GPU ({torch.cuda.get_device_name()}) has no bfloat16; "
                             "use torch_dtype=float16")
    _check_attention(cfg.attn_implementation)
    _check_quantization(cfg)


def _check_attention(name: str | None) -> None:
    if name is None or "/" in name:  # a Hub kernel ("kernels-community/..."): transformers fetches it
        return
    from transformers import AttentionInterface  # public; its registry is class-wide

    known = ["eager", *AttentionInterface().valid_keys()]
    check(name in known, f"attn_implementation={name!r} is unknown; transformers knows {', '.join(known)}")
    if name in _KERNEL_PACKAGES:
        import transformers.utils

        probe, how = _KERNEL_PACKAGES[name]
        check(getattr(transformers.utils, probe)(),
              f"attn_implementation={name} needs the flash-attn package and a CUDA GPU, not found here ({how}); "
              "attn_implementation=sdpa is the built-in fast kernel")


def _check_quantization(cfg) -> None:
    given = [k for k in ("quantization", "load_in_4bit", "load_in_8bit") if getattr(cfg, k, None)]
    check(len(given) <= 1, f"{' and '.join(given)}: give one of them (quantization=nf4|fp4|int8)")
    q = quantization(cfg)
    if q is None:
        return
    check(q in QUANTIZATIONS, f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {q!r}")
    check(cfg.model_name_or_path is not None,
          f"quantization={q} quantizes pretrained weights while loading them: give model_name_or_path=...")
    continuing = adapter_base(cfg.model_name_or_path) is not None  # an adapter folder trains its own adapter
    check(cfg.lora.r > 0 or continuing,
          f"quantization={q} freezes the quantized weights; train LoRA adapters on them: set lora.r (e.g. lora.r=16)")
    check(not cfg.lora.merge, f"quantization={q}: lora.merge=true cannot fold adapters into quantized weights; "
                              "merge into the unquantized base afterwards")
    check(importlib.util.find_spec("bitsandbytes") is not None,
          f"quantization={q} needs bitsandbytes: pip install 'notrainer[bnb]'")


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def pretrained_kwargs(cfg) -> dict:
    """Keyword arguments for `from_pretrained`: dtype, attn_implementation, quantization_config
    (with the weights placed on this process's device, as k-bit loading requires).

    `use_kernels=False`: transformers 5.25 turned Hub kernels on by default in `from_pretrained`
    (layers swapped for kernels downloaded from the Hub, and the `kernels` package required);
    notrainer loads the model it is given, offline, as transformers 5.24 and earlier did."""
    out: dict = {"use_kernels": False}
    if cfg.torch_dtype:
        out["dtype"] = cfg.torch_dtype if cfg.torch_dtype == "auto" else _torch_dtype(cfg.torch_dtype)
    if cfg.attn_implementation:
        out["attn_implementation"] = cfg.attn_implementation
    q = quantization(cfg)
    if q:
        from accelerate import PartialState
        from transformers import BitsAndBytesConfig

        # The 4-bit matmuls run in this dtype; the weights' own dtype when it is a 16-bit one.
        compute = cfg.torch_dtype if cfg.torch_dtype in ("bfloat16", "float16") else \
            {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.mixed_precision, "float32")
        extra = {"bnb_4bit_compute_dtype": _torch_dtype(compute)} if q != "int8" else {}
        out["quantization_config"] = BitsAndBytesConfig(**QUANTIZATIONS[q], **extra)
        out["device_map"] = {"": PartialState().device}
    return out


def config_kwargs(cfg) -> dict:
    """Keyword arguments for `from_config` (a model built from scratch): dtype unless auto (the
    config's own), attn_implementation."""
    out: dict = {}
    if cfg.torch_dtype and cfg.torch_dtype != "auto":
        out["dtype"] = _torch_dtype(cfg.torch_dtype)
    if cfg.attn_implementation:
        out["attn_implementation"] = cfg.attn_implementation
    return out


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_quantized", False))


__all__ = ["check_loading", "check_model_folder", "pretrained_kwargs", "config_kwargs", "quantization", "is_quantized", "DTYPES", "QUANTIZATIONS"]


ADAPTER_CONFIG = "adapter_config.json"


def check_model_folder(path, key_name: str = "model_name_or_path") -> None:
    """A local model (or tokenizer, or adapter) folder whose files are damaged: one line naming
    the file, before any loader blames another part. Every JSON file at the top of the folder
    must parse (config.json, tokenizer files, the weights index); every safetensors file must
    hold its whole header and the bytes the header describes (a cut-off download or copy).
    Only the headers are read: cheap for any model size. A Hub name (no such folder) passes."""
    folder = os.path.expanduser(str(path)) if path else None
    if not folder or not os.path.isdir(folder):
        return
    names = sorted(os.listdir(folder))
    for name in names:
        full = os.path.join(folder, name)
        if name.endswith(".json") and os.path.isfile(full):
            try:
                with open(full, encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
                raise UsageError(f"{key_name}={path}: {name} of the model is not valid JSON{where}; the folder is damaged, "
                                 "re-download or re-export the model") from None
    for name in names:
        full = os.path.join(folder, name)
        if name.endswith(".safetensors") and os.path.isfile(full):
            problem = _safetensors_problem(full)
            if problem:
                raise UsageError(f"{key_name}={path}: {name} is damaged or incomplete ({problem}); "
                                 "re-download or re-export the model")


def _safetensors_problem(file: str) -> str | None:
    """What is wrong with a safetensors file's layout, or None: an 8-byte header length, the
    JSON header, then exactly the data bytes the header's offsets describe."""
    import struct

    size = os.path.getsize(file)
    if size < 8:
        return f"{size} bytes, too short for a header"
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if 8 + length > size:
            return f"{size} bytes, its header alone says {8 + length}"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return "its header is not valid JSON"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"{size} bytes where its header describes {expected}"
    return None


def adapter_base(path) -> str | None:
    """The base model an adapter folder names (its adapter_config.json), or None when `path` is
    not an adapter folder (a model folder or a Hub name)."""
    config = os.path.join(str(path), ADAPTER_CONFIG)
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        raise UsageError(f"{path}: {ADAPTER_CONFIG} of the adapter is not a valid JSON object; the folder is damaged, "
                         "re-download or re-export the adapter") from None
    check(base, f"{path}: {ADAPTER_CONFIG} names no base_model_name_or_path; pass the base model and lora.r instead")
    return base
