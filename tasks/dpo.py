"""Preference tuning of a causal LM: DPO and its variants (ipo, hinge, and the reference-free simpo, orpo).

    accelerate launch -m notrainer.run task=dpo model_name_or_path=runs/sft train_file=pairs.jsonl [lora.r=16]

Data: preference pairs (notrainer.tasks.preference). Chosen and rejected go through the model in one
concatenated forward; each response's log-probability is summed over its own tokens only. The losses
are pure functions of those sums (notrainer.modeling.preference_losses).

The reference model (the loss types sigmoid, ipo, hinge), the cheapest exact choice:
  - with a new peft adapter (lora.r > 0): the policy itself with the adapter disabled (peft's
    `disable_adapter()`), no second copy in memory;
  - `precompute_ref_log_probs=true`: one pass over the data before training, with the initial
    weights; stored in output_dir/reference_logps/ so that a resume reads it instead of redoing it;
  - otherwise a frozen copy of the initial model, made in `setup` (before the engine wraps the
    policy), in eval mode with no gradients, run under the same autocast as the policy. The CLI
    has the engine place it (`frozen_models`, notrainer.engine.prepare.prepare_frozen): sharded
    like the policy under DeepSpeed ZeRO-3 (an inference-only engine) and FSDP2, on the device
    otherwise; it is never wrapped by DDP (it has no gradients to sync) nor checkpointed.

Metrics, as TRL's DPO trainer: in the training log (each logging step) rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected; in evaluation (eval_ prefix) rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, plus logps/margins (the policy's
chosen-minus-rejected log-probability) and, with a reference, ref_logps/margins.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from notrainer.config import key
from notrainer.engine.prepare import frozen_copy
from notrainer.errors import check, did_you_mean
from notrainer.modeling import preference_losses as pl

from .preference import PreferenceConfig, PreferenceTask, model_inputs

REF_DIR = "reference_logps"


@dataclass
class DPOConfig(PreferenceConfig):
    loss_type: str = key("sigmoid", "sigmoid (DPO), ipo, hinge; reference-free: simpo, orpo")
    beta: float = key(0.1, "strength of the implicit KL penalty (DPO's beta; SimPO's reward scale; ORPO's lambda)")
    label_smoothing: float = key(0.0, "sigmoid, simpo: probability that a pair's labels are flipped (cDPO)")
    simpo_gamma: float = key(0.5, "simpo: target reward margin")
    precompute_ref_log_probs: bool = key(False, "compute the reference log-probs in one pass before training "
                                                "(stored in output_dir/reference_logps/); no reference model in memory")

    def validate(self) -> None:
        super().validate()
        check(self.loss_type in pl.LOSS_TYPES, f"loss_type={self.loss_type!r} is unknown"
                                               f"{did_you_mean(self.loss_type, list(pl.LOSS_TYPES))}; "
                                               f"choose one of {', '.join(pl.LOSS_TYPES)}")
        check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        check(0.0 <= self.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5)")
        check(self.label_smoothing == 0 or self.loss_type in ("sigmoid", "simpo"),
              f"label_smoothing applies to loss_type=sigmoid or simpo, not {self.loss_type}")
        check(not (self.precompute_ref_log_probs and self.loss_type in pl.REFERENCE_FREE_LOSSES),
              f"precompute_ref_log_probs=true: loss_type={self.loss_type} uses no reference model")


class DPOTask(PreferenceTask):
    name = "dpo"
    Config = DPOConfig
    auto_model = "AutoModelForCausalLM"
    embedded_defaults = dict(learning_rate=1e-3, num_train_epochs=2.0, per_device_train_batch_size=16,
                             per_device_eval_batch_size=32, warmup_ratio=0.05, lr_scheduler_type="cosine",
                             max_length=32)

    #: how the reference log-probs are obtained: "adapter", "copy", "precomputed" or "none" (set in setup)
    _reference: Optional[str] = None
    #: the frozen copy ("copy"), or the initial model for the one pass ("precomputed")
    _ref_model = None
    #: the mixed precision the policy runs under (the frozen copy runs under the same autocast)
    _autocast_dtype = None

    def setup(self, model, tokenizer) -> None:
        """Chooses the reference (see the module docstring) and, for "copy", makes it."""
        super().setup(model, tokenizer)
        cfg = self.cfg
        from notrainer.modeling.lora import is_peft_model

        self._autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision or "no")
        if cfg.loss_type in pl.REFERENCE_FREE_LOSSES:
            self._reference = "none"
        elif cfg.precompute_ref_log_probs:
            # The pass runs before the engine wraps the policy, inside main_process_first (no collectives
            # there): a model ZeRO-3 partitioned as it was built is copied with its weights gathered here.
            partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
            self._reference, self._ref_model = "precomputed", frozen_copy(model) if partitioned else model
        elif _adds_adapter(cfg) and not is_peft_model(model):
            self._reference = "adapter"  # the base is the policy before training: exact
        else:
            # An adapter loaded from model_name_or_path keeps training: the reference is that adapted
            # model as loaded, so it is copied too.
            self._reference = "copy"
            self._ref_model = frozen_copy(model)

    def frozen_models(self):
        """The frozen copy, which the CLI has the engine place (sharded under ZeRO-3 / FSDP2)."""
        return {"_ref_model": self._ref_model} if self._reference == "copy" else {}

    # ------------------------------------------------------------------ precomputed reference log-probs

    def prepare_datasets(self, raw, tokenizer):
        out = super().prepare_datasets(raw, tokenizer)
        if self._reference != "precomputed":
            return out
        import datasets

        collate = self.collator(tokenizer)
        out = datasets.DatasetDict({name: self._with_reference_logps(name, split, collate) for name, split in out.items()})
        self._ref_model = None  # the pass is done: nothing of it stays
        return out

    def extra_keys(self) -> list[str]:
        return ["ref_chosen_logps", "ref_rejected_logps"] if self._reference == "precomputed" else []

    def _with_reference_logps(self, name: str, split, collate):
        from accelerate import PartialState
        from safetensors.torch import load_file, save_file

        cfg = self.cfg
        path = os.path.join(cfg.output_dir, REF_DIR, f"{name}.safetensors")
        fingerprint = _fingerprint(split, self._ref_model)
        state = PartialState()
        values = None
        if os.path.isfile(path):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                same = (f.metadata() or {}).get("fingerprint") == fingerprint
            if same:
                values = load_file(path)
                if state.is_main_process:
                    print(f"reference log-probs: {len(split)} {name} pairs read from {path}", flush=True)
        if values is None:
            values = self._reference_pass(split, collate, state.device)
            if state.is_main_process:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = path + ".tmp"
                save_file(values, tmp, metadata={"fingerprint": fingerprint})
                os.replace(tmp, path)
                print(f"reference log-probs: {len(split)} {name} pairs computed, saved to {path}", flush=True)
        return split.add_column("ref_chosen_logps", values["chosen"].tolist()) \
                    .add_column("ref_rejected_logps", values["rejected"].tolist())

    @torch.no_grad()
    def _reference_pass(self, split, collate, device) -> dict[str, torch.Tensor]:
        model = self._ref_model
        was_training, before = model.training, next(model.parameters()).device
        model.eval().to(device)
        chosen, rejected = [], []
        bs = self.cfg.per_device_eval_batch_size
        try:
            for start in range(0, len(split), bs):
                batch = collate([split[i] for i in range(start, min(start + bs, len(split)))])
                batch = {k: v.to(device) for k, v in batch.items()}
                with self._autocast(device):
                    c, r, _, _ = self._policy_logps(model, batch)
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
        finally:
            model.to(before).train(was_training)
        return {"chosen": torch.cat(chosen).contiguous(), "rejected": torch.cat(rejected).contiguous()}

    # ------------------------------------------------------------------ log-probs

    def _autocast(self, device):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=self._autocast_dtype)

    @staticmethod
    def _policy_logps(model, batch):
        """One forward over the 2B rows: (chosen, rejected) summed log-probs and response lengths."""
        logits = model(**model_inputs(batch), use_cache=False).logits
        logps, lens = pl.sequence_logps(logits, batch["labels"])
        del logits
        n = logps.shape[0] // 2
        return logps[:n], logps[n:], lens[:n], lens[n:]

    @torch.no_grad()
    def reference_logps(self, model, batch):
        """The reference's (chosen, rejected) summed log-probs for a batch, or (None, None)."""
        if self._reference == "none":
            return None, None
        if self._reference == "precomputed":
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self._reference == "adapter":
            from accelerate.utils import extract_model_from_parallel

            peft_model = extract_model_from_parallel(model)
            check(hasattr(peft_model, "disable_adapter"), "task=dpo: the adapter reference needs a peft model")
            with peft_model.disable_adapter():
                c, r, _, _ = self._policy_logps(model, batch)
            return c, r
        ref = self._ref_model
        device = batch["input_ids"].device
        if not getattr(ref, "placed_by_engine", False) and next(ref.parameters()).device != device:
            ref.to(device)  # a Loop outside the CLI: follow the batches onto the device at first use
        with self._autocast(device):
            c, r, _, _ = self._policy_logps(ref, batch)
        return c, r

    def _pair_losses(self, model, batch):
        cfg = self.cfg
        c, r, c_len, r_len = self._policy_logps(model, batch)
        ref_c, ref_r = self.reference_logps(model, batch)
        losses, c_reward, r_reward = pl.preference_loss(cfg.loss_type, c, r, c_len, r_len, ref_c, ref_r, beta=cfg.beta,
                                                        label_smoothing=cfg.label_smoothing,
                                                        simpo_gamma=cfg.simpo_gamma)
        return losses, c_reward, r_reward, c, r, ref_c, ref_r

    # ------------------------------------------------------------------ training and evaluation

    def loss(self, model, batch):
        # The loss, and TRL's training metrics beside it in the log (the loop averages them over
        # the logging window like the loss: engine/batch.py split_loss).
        losses, c_reward, r_reward, c, r, _, _ = self._pair_losses(model, batch)
        c_reward, r_reward = c_reward.detach().float(), r_reward.detach().float()
        return {"loss": losses.mean(), "rewards/chosen": c_reward.mean(), "rewards/rejected": r_reward.mean(),
                "rewards/accuracies": (c_reward > r_reward).float().mean(),
                "rewards/margins": (c_reward - r_reward).mean(),
                "logps/chosen": c.detach().float().mean(), "logps/rejected": r.detach().float().mean()}

    def eval_step(self, model, batch):
        losses, c_reward, r_reward, c, r, ref_c, ref_r = self._pair_losses(model, batch)
        out = {"loss": losses.float(), "num_items": torch.ones_like(losses, dtype=torch.float32),
               "rewards_chosen": c_reward.float(), "rewards_rejected": r_reward.float(),
               "logps_chosen": c.float(), "logps_rejected": r.float()}
        if ref_c is not None:
            out["ref_logps_margin"] = (ref_c - ref_r).float()
        return out

    def compute_metrics(self, outputs, eval_loss):
        if not outputs.get("rewards_chosen"):
            return {}
        get = lambda k: np.concatenate(outputs[k]).astype("float64")  # noqa: E731
        cr, rr, c, r = get("rewards_chosen"), get("rewards_rejected"), get("logps_chosen"), get("logps_rejected")
        metrics = {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(), "rewards/accuracies": (cr > rr).mean(),
                   "rewards/margins": (cr - rr).mean(), "logps/chosen": c.mean(), "logps/rejected": r.mean(),
                   "logps/margins": (c - r).mean()}
        if outputs.get("ref_logps_margin"):
            metrics["ref_logps/margins"] = get("ref_logps_margin").mean()
        return {k: float(v) for k, v in metrics.items()}


def _adds_adapter(cfg) -> bool:
    """Whether build() puts a new peft adapter on the model after setup (lora.r, or a peft method)."""
    if getattr(cfg.lora, "r", 0):
        return True
    peft_cfg = getattr(cfg, "peft", None)
    method = getattr(peft_cfg, "method", None) if peft_cfg is not None else None
    return bool(method) and method not in ("lora", "none")


def _fingerprint(split, model) -> str:
    """What the stored reference log-probs depend on: the tokenized pairs and the initial weights."""
    h = hashlib.sha256()
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        for row in split[col]:
            h.update(np.asarray(row, dtype=np.int64).tobytes())
            h.update(b"|")
    with torch.no_grad():
        for name, p in model.state_dict().items():
            h.update(name.encode())
            h.update(np.float64(p.double().sum().item()).tobytes())
    return h.hexdigest()


__all__ = ["DPOConfig", "DPOTask"]
