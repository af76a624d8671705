"""Every peft method behind one key: `peft.method=` (docs/peft.md).

    python -m notrainer.run task=sft peft.method=prompt_tuning peft.num_virtual_tokens=20
    python -m notrainer.run task=classification peft.method=loha peft.r=8 peft.merge=true

`peft.*` is a free-form group: `peft.method` names the method, `peft.merge=true` asks for merged
full weights in the export, and every other `peft.<name>` is passed to the method's peft config
class (`peft.num_virtual_tokens=20` -> `PromptTuningConfig(num_virtual_tokens=20)`), checked at
config time against that class's fields (an unknown name gets a did-you-mean) and by the class
itself (a bad value fails in one line before anything is built). LoRA keeps its own `lora.*`
keys (`lora.r > 0` alone still means LoRA); `peft.method=lora` adds peft's other LoRA options
(`peft.use_dora=true`, `peft.use_rslora=true`).

Two kinds of methods:
- weight adapters (lora, loha, lokr, ia3): layers wrapped by peft; peft can fold them into the
  base weights, so the export can write `merged/` (plain `from_pretrained`, no peft);
- prompt learning (prefix_tuning, prompt_tuning, p_tuning): learned virtual tokens (prompt
  tuning, p-tuning) or per-layer key/value prefixes (prefix tuning) in front of the input;
  nothing to merge, so the export is the adapter folder and says so in one line.

Checkpoints are adapter-only for every method (notrainer/modeling/adapter_checkpoints.py keeps
the trainable tensors of any peft model).
"""

from __future__ import annotations

import copy
import dataclasses
import sys

from notrainer.errors import UsageError, check, did_you_mean, first_line
from notrainer.modeling.peft_support import PEFT_TASK_TYPES, default_target_modules, for_kbit_training, import_peft

#: peft.method= value -> (peft config class name, what it trains)
METHODS = {
    "lora": ("LoraConfig", "low-rank update B @ A beside each target linear layer (keys: lora.*)"),
    "loha": ("LoHaConfig", "low-rank Hadamard product update (LoHa) of each target layer"),
    "lokr": ("LoKrConfig", "Kronecker-product update (LoKr) of each target layer"),
    "ia3": ("IA3Config", "learned scaling vectors on keys, values and feed-forward activations (IA3)"),
    "prefix_tuning": ("PrefixTuningConfig", "learned key/value prefixes in every attention layer"),
    "prompt_tuning": ("PromptTuningConfig", "learned virtual-token embeddings in front of the input"),
    "p_tuning": ("PromptEncoderConfig", "virtual tokens produced by a small prompt encoder (MLP/LSTM)"),
}
PROMPT_LEARNING = ("prefix_tuning", "prompt_tuning", "p_tuning")
MERGEABLE = ("lora", "loha", "lokr", "ia3")
#: peft task types the prompt-learning methods are run and tested with here
PROMPT_TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS")
DEFAULT_VIRTUAL_TOKENS = 20
#: keys of the peft group that are ours, not the config class's
OWN_KEYS = ("method", "merge")
#: config-class fields that notrainer sets itself
SET_HERE = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode")
#: LoRA's fields that have a lora.* key: one source each
LORA_KEYS = {"r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
             "target_modules": "lora.target_modules"}


def method_of(cfg) -> str | None:
    """The run's peft method: `peft.method`, else lora when `lora.r > 0`, else None."""
    group = dict(getattr(cfg, "peft", None) or {})
    method = group.get("method")
    if method is None and getattr(cfg, "lora", None) is not None and cfg.lora.r:
        return "lora"
    return None if method is None else str(method).lower()


def wants_merge(cfg) -> bool:
    return bool(dict(getattr(cfg, "peft", None) or {}).get("merge")) or bool(cfg.lora.merge)


def passthrough(cfg) -> dict:
    """The `peft.<name>` keys handed to the peft config class (plain Python values)."""
    group = dict(getattr(cfg, "peft", None) or {})
    return {k: _plain(v) for k, v in group.items() if k not in OWN_KEYS}


def _plain(value):
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return value


def config_class(method: str):
    peft = import_peft(f"peft.method={method}")
    return getattr(peft, METHODS[method][0])


def check_peft(cfg) -> None:
    """Config-time checks (TrainConfig.validate): the method, the pass-through keys and their
    values (the peft config class is built once, without a model), and the lora.* interplay."""
    group = dict(getattr(cfg, "peft", None) or {})
    method = group.get("method")
    if method is None:
        extra = [k for k in group if k not in OWN_KEYS]
        check(not extra, f"peft.{extra[0] if extra else ''} needs peft.method=... (one of {', '.join(METHODS)})")
        check(not group.get("merge") or cfg.lora.r, "peft.merge=true needs a peft method: peft.method=... or lora.r")
        return
    check(isinstance(method, str), f"peft.method must be a name, got {method!r}")
    method = method.lower()
    check(method in METHODS, f"peft.method={method!r} is unknown{did_you_mean(method, list(METHODS))}; "
                             f"choose one of {', '.join(METHODS)}")
    check(isinstance(group.get("merge", False), bool), "peft.merge must be true or false")
    if method == "lora":
        check(cfg.lora.r > 0, "peft.method=lora needs lora.r > 0 (for example lora.r=8)")
    else:
        check(not cfg.lora.r, f"lora.r={cfg.lora.r} and peft.method={method}: choose one method "
                              f"(lora.* configures LoRA; drop lora.r for {method})")
    if group.get("merge") and method in PROMPT_LEARNING:
        pass  # allowed: the export says in one line that there is nothing to merge
    cls = config_class(method)
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in SET_HERE]
    kwargs = passthrough(cfg)
    for name in kwargs:
        if method == "lora" and name in LORA_KEYS:
            raise UsageError(f"peft.{name}: LoRA's {name} is set with {LORA_KEYS[name]}")
        check(name in fields, f"peft.{name} is not an option of peft.method={method} ({cls.__name__})"
                              f"{did_you_mean(name, fields)}")
    try:
        build_config(cfg, method, task_type=None, model=None)
    except UsageError:
        raise
    except (TypeError, ValueError) as e:
        raise UsageError(f"peft.method={method} with {kwargs}: {first_line(e)}") from None


def build_config(cfg, method: str, task_type: str | None, model=None):
    """The peft config object for `method`: lora.* for LoRA's own fields, the pass-through keys
    on top, notrainer's defaults where the user gave nothing."""
    cls = config_class(method)
    kwargs = passthrough(cfg)
    if method == "lora":
        lc = cfg.lora
        targets = list(lc.target_modules) if lc.target_modules else None
        if targets is None and model is not None:

            targets = default_target_modules(model)
        kwargs.update(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets)
    elif method in PROMPT_LEARNING:
        kwargs.setdefault("num_virtual_tokens", DEFAULT_VIRTUAL_TOKENS)
    elif method in ("loha", "lokr") and kwargs.get("target_modules") is None and model is not None:
        kwargs["target_modules"] = _default_targets(model)
    return cls(task_type=task_type, **kwargs)


def _default_targets(model):
    """LoHa/LoKr: peft's per-architecture table (the LoRA one), else every linear layer."""

    return default_target_modules(model)


def apply(model, cfg, task=None):
    """`model` wrapped in a peft model for the run's method (not LoRA's: see lora.apply_lora)."""

    method = method_of(cfg)
    peft = import_peft(f"peft.method={method}")
    check(hasattr(model, "config"), f"peft.method={method} needs a transformers model (one with a .config)")
    task_type = PEFT_TASK_TYPES.get(getattr(task, "auto_model", None))
    if method in PROMPT_LEARNING:
        name = getattr(task, "name", None) or "this task"
        check(task_type in PROMPT_TASK_TYPES,
              f"peft.method={method} runs with causal LM, seq2seq and sequence-classification tasks "
              f"(clm, sft, seq2seq, classification), not task={name}")
        check(not getattr(cfg, "packing", False),
              f"peft.method={method} with packing=true: peft drops the packed position ids of prompt-learning "
              "models, so packed examples would attend to each other; use packing=false")
        check(not cfg.gradient_checkpointing, f"peft.method={method} with gradient_checkpointing=true is not "
                                              "supported here (nothing frozen to save memory on); drop it")
    if method == "prefix_tuning":
        check(_takes_past_key_values(model, task_type), f"peft.method=prefix_tuning: peft cannot hand its prefixes to "
                                             f"{type(model).__name__} (its forward takes no past_key_values); "
                                             "use prompt_tuning or p_tuning")
    config = build_config(cfg, method, task_type, model)
    try:
        model = peft.get_peft_model(for_kbit_training(model), config)
    except (ValueError, TypeError, KeyError) as e:  # a target module that matches nothing, an unsupported model
        raise UsageError(f"peft.method={method}: {first_line(e)}") from None
    if method in ("prompt_tuning", "p_tuning") and task_type == "CAUSAL_LM":
        model.register_forward_hook(_drop_virtual_token_logits, with_kwargs=True)
    if cfg.gradient_checkpointing and method not in PROMPT_LEARNING:
        model.enable_input_require_grads()
    return model


def _takes_past_key_values(model, task_type: str) -> bool:
    """Whether peft can hand the prefixes (a key/value cache) to this model. For a language model
    (causal or seq2seq) peft passes `past_key_values=`, which transformers 5.24 still accepts
    under its new name `cache` (a shim until 5.40); for the other task types peft looks for a
    `past_key_values` parameter by name, on the model or its backbone."""
    import inspect

    names = {"past_key_values", "cache"} if task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM") else {"past_key_values"}
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    return any(m is not None and names & set(inspect.signature(m.forward).parameters) for m in (model, backbone))


def _drop_virtual_token_logits(module, args, kwargs, output):
    """A causal LM under prompt tuning / p-tuning returns logits for the virtual tokens too
    (batch, n_virtual + seq, vocab); the tasks' per-token evaluation (and the chunked loss's
    hidden states) line up with the labels, so the virtual positions are dropped. peft's own
    loss (labels padded with -100 for them) is computed before and stays as it is."""
    logits = getattr(output, "logits", None)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if logits is None or ids is None or logits.dim() < 2:
        return output
    seq = ids.shape[1]
    if logits.shape[1] > seq:
        output.logits = logits[:, -seq:]
    return output


def is_mergeable(model) -> bool:
    config = model.peft_config["default"]
    return not getattr(config, "is_prompt_learning", False) and str(getattr(config.peft_type, "value", config.peft_type)
                                                                     ).lower() in MERGEABLE


def method_name(model) -> str:
    peft_type = model.peft_config["default"].peft_type
    name = str(getattr(peft_type, "value", peft_type)).lower()
    return {"prompt_tuning": "prompt_tuning", "p_tuning": "p_tuning", "prefix_tuning": "prefix_tuning"}.get(name, name)


def base_state_dict(model, state_dict: dict) -> dict:
    """The base model's own state dict (its original key names, the task head as initialised)
    from the full state dict of a peft model of any method, without the adapter tensors."""
    from peft.tuners.tuners_utils import BaseTuner

    tuner = isinstance(model.base_model, BaseTuner)
    prefix = "base_model.model." if tuner else "base_model."
    adapter_prefix = getattr(model.base_model, "prefix", None) if tuner else None
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix) or ".modules_to_save." in key:
            continue  # prompt_encoder.*, word_embeddings.* (a second name of the embeddings), trained heads
        if adapter_prefix and f".{adapter_prefix}" in key:
            continue
        out[key.removeprefix(prefix).replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return out


def merged_base(model, state_dict: dict):
    """A copy of the base model with the trained adapters folded in by peft (`merge_and_unload`),
    for the weight-adapter methods other than LoRA (whose merge is computed from the state dict
    directly, see lora.merged_state_dict). None under ZeRO-3 (the live parameters are shards)."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return None
    clone = copy.deepcopy(model)
    clone.load_state_dict(state_dict, strict=False)
    return clone.merge_and_unload()


def note(message: str) -> None:
    print(f"notrainer: note: {message}", file=sys.stderr)


__all__ = ["METHODS", "PROMPT_LEARNING", "MERGEABLE", "check_peft", "method_of", "apply", "build_config",
           "base_state_dict", "merged_base", "is_mergeable", "wants_merge"]
