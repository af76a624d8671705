"""Reward modelling on preference pairs (the RLHF reward model, as TRL's RewardTrainer).

    accelerate launch -m notrainer.run task=reward model_name_or_path=Qwen/Qwen2-0.5B train_file=pairs.jsonl

Data: preference pairs (notrainer.tasks.preference: plain or conversational), optionally a per-pair
`margin` column. The model is `AutoModelForSequenceClassification` with one output, the score of
prompt + response; the loss is -logsigmoid(r_chosen - r_rejected - margin), both responses of a
pair in one forward pass. Metrics: eval_accuracy (pairs where the chosen response scores higher),
eval_margin (mean r_chosen - r_rejected), eval_chosen_score, eval_rejected_score.

The export loads with from_pretrained and scores a text (docs/preference.md):

    model, tok = AutoModelForSequenceClassification.from_pretrained(run), AutoTokenizer.from_pretrained(run)
    score = model(**tok(prompt + response + tok.eos_token, return_tensors="pt")).logits[0, 0].item()
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from notrainer.config import key
from notrainer.modeling.preference_losses import reward_model_loss

from .preference import PreferenceConfig, PreferenceTask, model_inputs


@dataclass
class RewardConfig(PreferenceConfig):
    margin_column: str = key("margin", "optional column with a per-pair margin subtracted from r_chosen - r_rejected")


class RewardTask(PreferenceTask):
    name = "reward"
    Config = RewardConfig
    auto_model = "AutoModelForSequenceClassification"
    embedded_defaults = dict(learning_rate=2e-3, num_train_epochs=3.0, per_device_train_batch_size=16,
                             per_device_eval_batch_size=32, warmup_ratio=0.05, lr_scheduler_type="cosine",
                             weight_decay=0.01, max_length=32)

    def model_kwargs(self, tokenizer) -> dict:
        return {"num_labels": 1}

    def extra_columns(self) -> dict[str, str]:
        return {"margin": self.cfg.margin_column}

    def setup(self, model, tokenizer) -> None:
        super().setup(model, tokenizer)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # the head finds each row's last token by it

    def _scores(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        scores = model(**model_inputs(batch)).logits[:, 0].float()
        n = scores.shape[0] // 2
        return scores[:n], scores[n:]

    def loss(self, model, batch):
        chosen, rejected = self._scores(model, batch)
        return reward_model_loss(chosen, rejected, batch.get("margin")).mean()

    def eval_step(self, model, batch):
        chosen, rejected = self._scores(model, batch)
        losses = reward_model_loss(chosen, rejected, batch.get("margin"))
        return {"loss": losses, "num_items": torch.ones_like(losses), "chosen_score": chosen, "rejected_score": rejected}

    def compute_metrics(self, outputs, eval_loss):
        if not outputs.get("chosen_score"):
            return {}
        chosen = np.concatenate(outputs["chosen_score"]).astype("float64")
        rejected = np.concatenate(outputs["rejected_score"]).astype("float64")
        return {"accuracy": float((chosen > rejected).mean()), "margin": float((chosen - rejected).mean()),
                "chosen_score": float(chosen.mean()), "rejected_score": float(rejected.mean())}
