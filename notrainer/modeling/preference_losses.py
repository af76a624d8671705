"""Preference-tuning losses (DPO and its variants) as pure functions of summed log-probabilities.

Every function takes per-pair tensors of shape (pairs,): the policy's log-probability of the
chosen and of the rejected response, each SUMMED over that response's tokens, and the number
of response tokens (for the length-normalised losses). The reference-based losses also take
the reference model's summed log-probabilities. Each returns per-pair losses and the per-pair
implicit rewards TRL logs as `rewards/chosen` and `rewards/rejected`:

| loss_type | per-pair loss | rewards |
|---|---|---|
| sigmoid (DPO) | -(1-ls) logsigmoid(b d) - ls logsigmoid(-b d), d = (c - c_ref) - (r - r_ref) | b (logp - logp_ref) |
| ipo | (d_avg - 1/(2b))^2, the log-ratios averaged per response token (as TRL) | b (logp - logp_ref) |
| hinge | relu(1 - b d) | b (logp - logp_ref) |
| simpo | -(1-ls) logsigmoid(b g) - ls logsigmoid(-b g), g = c/len_c - r/len_r - gamma/b | b logp/len |
| orpo | -c/len_c - b logsigmoid(log odds(c/len_c) - log odds(r/len_r)) | b logp/len |

(b: beta, ls: label_smoothing, c/r: summed log-probabilities of chosen/rejected.) simpo and
orpo need no reference model. ORPO's first term is the chosen response's mean token NLL (its
SFT term), per pair here so that a batch's loss is a mean over pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: loss types that compare the policy with a reference model
REFERENCE_LOSSES = ("sigmoid", "ipo", "hinge")
#: reference-free loss types
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
LOSS_TYPES = REFERENCE_LOSSES + REFERENCE_FREE_LOSSES


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's target tokens and their count, from a causal LM's
    logits (rows, seq, vocab) and labels (rows, seq; -100 where not a response token). The
    labels are shifted here (position t predicts label t + 1, as transformers' causal-LM loss).
    Differentiable; only one row of the logits at a time is upcast (to fp32 at least)."""
    from .losses import shift_labels

    targets = shift_labels(labels)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for a fp64 model
    per_row = [-F.cross_entropy(row.to(dtype), t, ignore_index=-100, reduction="none").sum()
               for row, t in zip(logits, targets)]
    return torch.stack(per_row), (targets != -100).sum(-1)


def _smoothed_sigmoid(x: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # conservative DPO (cDPO): the label is wrong with probability label_smoothing
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.1, label_smoothing: float = 0.0):
    d = (chosen - ref_chosen) - (rejected - ref_rejected)
    return _smoothed_sigmoid(beta * d, label_smoothing), beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta: float = 0.1):
    d = (chosen - ref_chosen) / chosen_len.clamp(min=1) - (rejected - ref_rejected) / rejected_len.clamp(min=1)
    return (d - 1 / (2 * beta)) ** 2, beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def hinge_loss(chosen, rejected, ref_chosen, ref_rejected, beta: float = 0.1):
    d = (chosen - ref_chosen) - (rejected - ref_rejected)
    return torch.relu(1 - beta * d), beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)


def simpo_loss(chosen, rejected, chosen_len, rejected_len, beta: float = 2.0, gamma: float = 0.5,
               label_smoothing: float = 0.0):
    c, r = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
    return _smoothed_sigmoid(beta * (c - r - gamma / beta), label_smoothing), beta * c, beta * r


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen, rejected, chosen_len, rejected_len, beta: float = 0.1):
    c = chosen.float() / chosen_len.clamp(min=1)
    r = rejected.float() / rejected_len.clamp(min=1)
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return -c - beta * F.logsigmoid(log_odds), beta * c, beta * r


def preference_loss(loss_type: str, chosen, rejected, chosen_len, rejected_len, ref_chosen=None, ref_rejected=None,
                    beta: float = 0.1, label_smoothing: float = 0.0, simpo_gamma: float = 0.5):
    """Dispatch on `loss_type`: per-pair (losses, chosen_rewards, rejected_rewards)."""
    chosen_len, rejected_len = chosen_len.to(chosen.dtype), rejected_len.to(chosen.dtype)
    if loss_type in REFERENCE_LOSSES and (ref_chosen is None or ref_rejected is None):
        raise ValueError(f"loss_type={loss_type} needs the reference model's log-probabilities")
    if loss_type == "sigmoid":
        return sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing)
    if loss_type == "ipo":
        return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta)
    if loss_type == "hinge":
        return hinge_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    if loss_type == "simpo":
        return simpo_loss(chosen, rejected, chosen_len, rejected_len, beta, simpo_gamma, label_smoothing)
    if loss_type == "orpo":
        return orpo_loss(chosen, rejected, chosen_len, rejected_len, beta)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def reward_model_loss(chosen_scores, rejected_scores, margin=None):
    """The Bradley-Terry reward-model loss per pair: -logsigmoid(r_chosen - r_rejected - margin)."""
    d = chosen_scores - rejected_scores
    if margin is not None:
        d = d - margin
    return -F.logsigmoid(d)


__all__ = ["LOSS_TYPES", "REFERENCE_LOSSES", "REFERENCE_FREE_LOSSES", "sequence_logps", "preference_loss",
           "sigmoid_loss", "ipo_loss", "hinge_loss", "simpo_loss", "orpo_loss", "reward_model_loss"]
