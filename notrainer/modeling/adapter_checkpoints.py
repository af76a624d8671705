"""Adapter-only checkpoints for LoRA and QLoRA runs.

A LoRA run trains a few million parameters on a frozen base of billions; a checkpoint that
stored the base again (16 GB for an 8B model) would make frequent checkpoints unaffordable
exactly where preemption is likely. With LoRA, a checkpoint's model.safetensors holds only the
trainable tensors (the adapters, and a task head peft keeps trainable); the optimizer, scheduler,
RNG and counters are saved as for any run. The frozen base is referenced instead: base_model.json
names it and fingerprints it, and a resume checks that fingerprint before anything is loaded.

The fingerprint of a base loaded from a folder (or the Hub cache) covers its config.json and,
for every weights file, its name, its size, its safetensors header (names, shapes, dtypes,
offsets) and its first MiB of data: cheap at any model size. A base built from a config (a random
init, seeded) has no files: its fingerprint sums its frozen tensors.

Everything happens in two accelerate hooks on the accelerator (`register`), so the loop and
notrainer/engine/checkpoint.py stay generic. FSDP and DeepSpeed write their own (full) formats.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import NamedTuple

import torch

from notrainer.modeling import lora
from notrainer.errors import UsageError

BASE_FILE = "base_model.json"
_SAMPLE_BYTES = 1 << 20


def base_identity(model, cfg) -> dict:
    """What the frozen base is: its name or path and a fingerprint (see the module docstring)."""
    from notrainer.modeling.loading import quantization

    name = cfg.model_name_or_path
    base = (lora.adapter_base(name) or name) if name else None
    identity = {"base_model": base, "config_name": cfg.config_name if not base else None,
                "torch_dtype": cfg.torch_dtype, "quantization": quantization(cfg)}
    folder = _local_folder(base) if base else None
    if folder is not None:
        identity["fingerprint"] = _files_fingerprint(folder)
    elif base is None:
        identity["fingerprint"] = _weights_fingerprint(model)
    else:
        identity["fingerprint"] = None  # not in the local cache: only the name can be compared
    return identity


def _local_folder(name: str) -> str | None:
    if os.path.isdir(name):
        return name
    try:
        from transformers.utils import cached_file

        config = cached_file(name, "config.json", _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - offline and not cached: fall back to the name
        return None
    return os.path.dirname(config) if config else None


def _files_fingerprint(folder: str) -> str:
    digest = hashlib.sha256()
    names = sorted(n for n in os.listdir(folder)
                   if n == "config.json" or n.endswith((".safetensors", ".bin", ".index.json")))
    for n in names:
        path = os.path.join(folder, n)
        digest.update(f"{n}:{os.path.getsize(path)}:".encode())
        with open(path, "rb") as f:
            if n.endswith(".safetensors"):
                head = f.read(8)
                digest.update(f.read(int.from_bytes(head, "little")) if len(head) == 8 else head)
            digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _weights_fingerprint(model) -> str:
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:  # 9 significant digits: the same on any thread count
            digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{p.detach().double().sum().item():.9e};".encode())
    return digest.hexdigest()


def check_base(checkpoint: str, identity: dict) -> None:
    """A checkpoint of adapters only continues on the base it was trained on (UsageError)."""
    path = os.path.join(checkpoint, BASE_FILE)
    if not os.path.isfile(path):
        return  # a full checkpoint: it carries its own base weights
    with open(path) as f:
        saved = json.load(f)
    for key in ("base_model", "config_name", "torch_dtype", "quantization", "fingerprint"):
        if saved.get(key) != identity.get(key) and not (key == "fingerprint" and None in (saved.get(key), identity.get(key))):
            what = "its files changed" if key == "fingerprint" else f"{key}={saved.get(key)}, this run {identity.get(key)}"
            raise UsageError(f"resume_from_checkpoint: {checkpoint} holds adapters only, trained on another base model "
                             f"({what}); resume on the same base ({saved.get('base_model') or 'the same config and seed'})")


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


class IncompatibleKeys(NamedTuple):
    """What `load_state_dict` returns (the fields of torch's own result type, which is private)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class _TrainableView(torch.nn.Module):
    """Stands in for a LoRA model in accelerate's load: its state dict is the trainable tensors,
    so loading the adapter-only file is still strict (a missing or extra adapter tensor fails)."""

    def __init__(self, model):
        super().__init__()
        self._target = [model]  # in a list: not registered as a submodule

    def state_dict(self, *args, **kwargs):
        model = self._target[0]
        names = _trainable_names(model)
        return OrderedDict((k, v) for k, v in model.state_dict().items() if k in names)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        model = self._target[0]
        names = _trainable_names(model)
        missing, unexpected = sorted(names - state_dict.keys()), sorted(state_dict.keys() - names)
        if strict and (missing or unexpected):
            raise RuntimeError(f"adapter checkpoint: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.load_state_dict({k: v for k, v in state_dict.items() if k in names}, strict=False, assign=assign)
        return IncompatibleKeys(missing, unexpected)


def register(acc, identity: dict) -> None:
    """Make every `acc.save_state` of a LoRA model write only its trainable tensors (plus
    base_model.json), and every `acc.load_state` of such a checkpoint check the base and load
    only those tensors."""

    def is_lora(model) -> bool:
        return lora.is_peft_model(acc.unwrap_model(model))

    def before_save(models, weights, output_dir):
        if len(weights) != len(models):  # FSDP / DeepSpeed save their own formats
            return
        for i, model in enumerate(models):
            if is_lora(model):
                names = _trainable_names(model)
                weights[i] = OrderedDict((k, v) for k, v in weights[i].items() if k in names)
        if acc.is_main_process:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, BASE_FILE), "w") as f:
                json.dump(identity, f, indent=2)

    def before_load(models, input_dir):
        if not os.path.isfile(os.path.join(input_dir, BASE_FILE)):
            return  # a full checkpoint (written before adapter-only ones existed): loaded whole
        check_base(input_dir, identity)
        for i, model in enumerate(models):
            if is_lora(model):
                models[i] = _TrainableView(model)

    acc.register_save_state_pre_hook(before_save)
    acc.register_load_state_pre_hook(before_load)


__all__ = ["register", "base_identity", "check_base", "BASE_FILE"]
