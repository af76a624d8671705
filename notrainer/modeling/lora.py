"""LoRA adapters (peft) for any task's model, and their export.

    accelerate launch -m notrainer.run task=sft model_name_or_path=... lora.r=8 [lora.merge=true]

`apply_lora` wraps the model built by the task in a `peft.PeftModel` when `lora.r > 0`: the
base weights are frozen, only the adapters train, plus the task's fresh head where peft's task
type says so (e.g. the classifier of a sequence-classification model, via `modules_to_save`).
The optimizer only sees parameters that require grad, so nothing else changes in the loop.

The export writes a peft adapter folder (adapter_config.json + adapter_model.safetensors) at the
top of output_dir; with `lora.merge=true` also `merged/`, full weights with the adapters folded
in, loadable with plain `from_pretrained`. Both are computed from the full state dict the loop
gathers (`accelerator.get_state_dict`), so they work the same under DDP, ZeRO-3 and FSDP.

An adapter folder given as `model_name_or_path` is loaded through peft's own API (`from_pretrained`
below), not through transformers' adapter integration: that integration demands a peft newer than
the registry may offer (transformers 5.24 asks for peft >= 0.22 while 0.21.2 is the newest), and a
user's adapter folder must keep working with the versions that resolve.
"""

from __future__ import annotations

import os

from notrainer import compat
from notrainer.errors import UsageError, check, first_line
from notrainer.modeling import peft_methods
from notrainer.modeling.peft_support import (PEFT_TASK_TYPES, default_target_modules,  # noqa: F401 (re-exported)
                                             for_kbit_training, import_peft)
from notrainer.modeling.loading import adapter_base  # noqa: F401 - adapter_base is part of this module API

BASE_DIR = "base_model"
MERGED_DIR = "merged"


def from_pretrained(cls, path, **kwargs):
    """`cls.from_pretrained(path, **kwargs)`; for an adapter folder, its base model loaded that way
    and the adapter put on it, trainable (a `peft.PeftModel`), to continue training it."""
    base = adapter_base(path)
    if base is None:
        return cls.from_pretrained(path, **kwargs)
    peft = import_peft(f"model_name_or_path={path} is a LoRA adapter folder")
    return peft.PeftModel.from_pretrained(for_kbit_training(cls.from_pretrained(base, **kwargs)), path, is_trainable=True)


def apply_lora(model, cfg, task=None):
    """`model` wrapped in a peft model when the run asks for one: LoRA when `cfg.lora.r > 0`,
    another method with `peft.method=` (notrainer/modeling/peft_methods.py); else unchanged."""
    lc = cfg.lora
    method = peft_methods.method_of(cfg)
    if is_peft_model(model):
        # model_name_or_path was an adapter folder (see from_pretrained): its adapters already train.
        check(not lc.r and method is None,
              "model_name_or_path is a LoRA adapter folder: continue training that adapter without "
              "lora.r, or start a new one from its merged/ folder")
        return _with_input_grads(model, cfg)
    if method is None:
        return model
    if method != "lora":
        return peft_methods.apply(model, cfg, task)
    peft = import_peft("lora.r > 0")
    check(lc.alpha > 0, "lora.alpha must be > 0")
    check(0.0 <= lc.dropout < 1.0, "lora.dropout must be in [0, 1)")
    check(hasattr(model, "config"), "lora.r > 0 needs a transformers model (one with a .config)")
    task_type = PEFT_TASK_TYPES.get(getattr(task, "auto_model", None))
    config = peft_methods.build_config(cfg, "lora", task_type, model)  # lora.*, plus peft.* options
    targets = config.target_modules
    try:
        model = peft.get_peft_model(for_kbit_training(model), config)
    except ValueError as e:  # e.g. a target module name that matches nothing
        raise UsageError(f"lora.target_modules={targets}: {first_line(e)}") from None
    if peft_methods.wants_merge(cfg):
        for layer in compat.lora_layers(model):
            check(layer.base_kind in ("Linear", "Conv1D"),
                  f"lora.merge=true: cannot merge into {layer.name} ({layer.base_kind}); adapt only linear layers")
    return _with_input_grads(model, cfg)


def _with_input_grads(model, cfg):
    if cfg.gradient_checkpointing:
        # With frozen embeddings no input of the first checkpointed block requires grad;
        # this hook makes the embeddings' output require it so the adapters get gradients.
        model.enable_input_require_grads()
    return model


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def export(model, state_dict: dict, out_dir: str, merge: bool = False, tokenizer=None, final_dir: str | None = None) -> None:
    """Main process only. `state_dict` is the full (gathered) state dict of the PeftModel;
    `out_dir` may be a temporary folder that becomes `final_dir` afterwards. Any peft method:
    the adapter folder always; with `merge`, also merged/ where peft can merge the method
    (otherwise one line says the adapter folder is the export)."""
    lora = _is_lora(model)
    base_sd = merged_state_dict(model, state_dict, with_adapters=False) if lora else \
        peft_methods.base_state_dict(model, state_dict)
    peft_config = model.peft_config["default"]
    kwargs = {}
    if not peft_config.base_model_name_or_path:
        # Trained from a random init: the adapter is useless without these exact base weights.
        model.get_base_model().save_pretrained(os.path.join(out_dir, BASE_DIR), state_dict=base_sd)
        peft_config.base_model_name_or_path = os.path.abspath(os.path.join(final_dir or out_dir, BASE_DIR))
        kwargs["save_embedding_layers"] = False  # the exported base already has the resized embeddings
    # peft keeps only the adapter (and modules_to_save) tensors of the state dict; with a
    # pretrained base whose vocabulary was resized, it also keeps the embeddings ("auto").
    model.save_pretrained(out_dir, state_dict=state_dict, **kwargs)
    method = peft_methods.method_name(model)
    if not peft_methods.is_mergeable(model):
        peft_methods.note(f"export: {method} cannot be merged into the weights (peft merges only weight adapters); "
                          f"{final_dir or out_dir} holds the adapter folder: load it with peft's AutoPeftModel* classes")
        return
    if not merge:
        return
    merged_dir = os.path.join(out_dir, MERGED_DIR)
    if lora:
        model.get_base_model().save_pretrained(merged_dir, state_dict=merged_state_dict(model, state_dict))
    else:
        merged = peft_methods.merged_base(model, state_dict)
        if merged is None:
            peft_methods.note(f"export: merging {method} under DeepSpeed ZeRO-3 is not supported here; "
                              f"{final_dir or out_dir} holds the adapter folder only")
            return
        merged.save_pretrained(merged_dir)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(merged_dir)


def _is_lora(model) -> bool:
    peft_type = model.peft_config["default"].peft_type
    return str(getattr(peft_type, "value", peft_type)) == "LORA"


def merged_state_dict(model, state_dict: dict, with_adapters: bool = True) -> dict:
    """The base model's own state dict (its original key names), with W + scaling * B @ A
    folded into every adapted layer when `with_adapters`."""
    prefix = "base_model.model."
    # A head in modules_to_save exists twice: the trained copy and the original.
    keep, drop = ((".modules_to_save.default.", ".original_module.") if with_adapters
                  else (".original_module.", ".modules_to_save.default."))

    def plain(key: str) -> str:
        return key.removeprefix(prefix).replace(".base_layer.", ".").replace(keep, ".")

    out = {plain(k): v for k, v in state_dict.items() if ".lora_" not in k and drop not in k}
    if not with_adapters:
        return out
    for name, _, scaling, fan_in_fan_out in compat.lora_layers(model):
        a = state_dict[f"{name}.lora_A.default.weight"].float()
        b = state_dict[f"{name}.lora_B.default.weight"].float()
        delta = (b @ a) * scaling
        if fan_in_fan_out:  # gpt2's Conv1D stores W transposed
            delta = delta.T
        key = plain(f"{name}.weight")
        out[key] = (out[key].float() + delta.to(out[key].device)).to(out[key].dtype)
    return out


__all__ = ["apply_lora", "from_pretrained", "adapter_base", "export", "merged_state_dict", "default_target_modules", "is_peft_model"]
