"""The DPO-family losses against hand computations from per-token log-probabilities of a tiny
model, and against TRL's own loss code on the same logits (when trl is installed)."""

from __future__ import annotations

import math
import os
import types

import pytest
import torch

from notrainer.data.builtin import tiny_config, train_tokenizer
from notrainer.modeling import preference_losses as pl
from notrainer.tasks.preference import PairCollator, builtin_preferences

TOL = 1e-5


@pytest.fixture(scope="module")
def pairs():
    """Logits of a tiny random llama on 4 built-in pairs (one forward over chosen + rejected),
    the batch, and a 'reference' (another random llama) on the same batch. In float64, so that
    the comparisons with the float64 hand computation measure the formulas, not fp32 rounding."""
    from transformers import AutoModelForCausalLM

    train, _ = builtin_preferences(n_train=40, n_eval=1)
    texts = [r[k] for r in train for k in ("prompt", "chosen", "rejected")]
    tok = train_tokenizer(texts, style="gpt")
    rows = []
    for r in train[:4]:
        rows.append({"prompt_ids": tok(r["prompt"])["input_ids"],
                     "chosen_ids": tok(r["chosen"] + tok.eos_token, add_special_tokens=False)["input_ids"],
                     "rejected_ids": tok(r["rejected"] + " really" + tok.eos_token, add_special_tokens=False)["input_ids"]})
    batch = PairCollator(tok.pad_token_id)(rows)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(tiny_config("llama", tok)).double().eval()
    torch.manual_seed(1)
    ref = AutoModelForCausalLM.from_config(tiny_config("llama", tok)).double().eval()
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref_logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return batch, logits, ref_logits


def hand_logps(logits, labels):
    """Per row: sum over response tokens of log softmax(logits[t])[label[t + 1]], in float64 Python."""
    sums, counts = [], []
    for row, lab in zip(logits.double(), labels):
        total, n = 0.0, 0
        for t in range(lab.shape[0] - 1):
            target = int(lab[t + 1])
            if target == -100:
                continue
            z = row[t].tolist()
            m = max(z)
            total += z[target] - (m + math.log(sum(math.exp(v - m) for v in z)))
            n += 1
        sums.append(total)
        counts.append(n)
    return sums, counts


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def split(values):
    n = len(values) // 2
    return values[:n], values[n:]


def test_sequence_logps_matches_hand_computation(pairs):
    batch, logits, _ = pairs
    got, count = pl.sequence_logps(logits, batch["labels"])
    want, want_count = hand_logps(logits, batch["labels"])
    assert count.tolist() == want_count and min(want_count) > 0
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=TOL, rtol=0)


@pytest.mark.parametrize("loss_type", pl.LOSS_TYPES)
@pytest.mark.parametrize("beta,smoothing", [(0.1, 0.0), (0.5, 0.2)])
def test_each_loss_matches_hand_computation(pairs, loss_type, beta, smoothing):
    if smoothing and loss_type not in ("sigmoid", "simpo"):
        pytest.skip("label_smoothing applies to sigmoid and simpo")
    batch, logits, ref_logits = pairs
    gamma = 0.3
    logps, lens = pl.sequence_logps(logits, batch["labels"])
    ref_logps, _ = pl.sequence_logps(ref_logits, batch["labels"])
    (c, r), (cl, rl) = split(logps), split(lens)
    rc, rr = split(ref_logps)
    got, got_cr, got_rr = pl.preference_loss(loss_type, c, r, cl, rl, rc, rr, beta=beta, label_smoothing=smoothing,
                                             simpo_gamma=gamma)

    s, n = hand_logps(logits, batch["labels"])
    rs, _ = hand_logps(ref_logits, batch["labels"])
    (hc, hr), (hcl, hrl), (hrc, hrr) = split(s), split(n), split(rs)
    want, want_cr, want_rr = [], [], []
    for i in range(len(hc)):
        d = (hc[i] - hrc[i]) - (hr[i] - hrr[i])
        if loss_type == "sigmoid":
            want.append(-(1 - smoothing) * logsig(beta * d) - smoothing * logsig(-beta * d))
        elif loss_type == "hinge":
            want.append(max(0.0, 1 - beta * d))
        elif loss_type == "ipo":
            da = (hc[i] - hrc[i]) / hcl[i] - (hr[i] - hrr[i]) / hrl[i]
            want.append((da - 1 / (2 * beta)) ** 2)
        elif loss_type == "simpo":
            g = hc[i] / hcl[i] - hr[i] / hrl[i] - gamma / beta
            want.append(-(1 - smoothing) * logsig(beta * g) - smoothing * logsig(-beta * g))
        elif loss_type == "orpo":
            ac, ar = hc[i] / hcl[i], hr[i] / hrl[i]
            log_odds = (ac - math.log(-math.expm1(ac))) - (ar - math.log(-math.expm1(ar)))
            want.append(-ac - beta * logsig(log_odds))
        if loss_type in pl.REFERENCE_LOSSES:
            want_cr.append(beta * (hc[i] - hrc[i]))
            want_rr.append(beta * (hr[i] - hrr[i]))
        else:
            want_cr.append(beta * hc[i] / hcl[i])
            want_rr.append(beta * hr[i] / hrl[i])
    for g, w in ((got, want), (got_cr, want_cr), (got_rr, want_rr)):
        assert torch.allclose(g.double(), torch.tensor(w, dtype=torch.float64), atol=TOL, rtol=0), (g, w)


def test_reference_losses_need_reference_logps(pairs):
    batch, logits, _ = pairs
    logps, lens = pl.sequence_logps(logits, batch["labels"])
    with pytest.raises(ValueError, match="reference"):
        pl.preference_loss("sigmoid", *split(logps), *split(lens))


def test_reward_model_loss_with_margin():
    c, r, m = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0]), torch.tensor([1.0, 0.0])
    got = pl.reward_model_loss(c, r, m)
    want = [-logsig(2.0 - 0.5 - 1.0), -logsig(-1.0)]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=TOL)


# ---------------------------------------------------------------------- TRL, on the same logits


def _trl_self(loss_type, beta, smoothing=0.0, gamma=0.5):
    # The attributes TRL's loss methods read from their trainer.
    return types.SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=smoothing,
                                 simpo_gamma=gamma, accelerator=types.SimpleNamespace(device="cpu"))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo", "orpo"])
def test_matches_trl(pairs, loss_type):
    """TRL's loss code on the same logits: its get_batch_logps turns them into sequence
    log-probabilities (summed, or averaged for ipo/simpo/orpo as TRL does), then
    CPOTrainer.cpo_loss (sigmoid/hinge/ipo/simpo: with log-ratios to the reference as its inputs,
    DPO's loss is CPO's loss of the log-ratios) or ORPOTrainer.odds_ratio_loss (orpo)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # its loss code lives under trl.experimental
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    batch, logits, ref_logits = pairs
    beta, labels = 0.2, batch["labels"]
    logps, lens = pl.sequence_logps(logits, labels)
    ref_logps, _ = pl.sequence_logps(ref_logits, labels)
    (c, r), (cl, rl), (rc, rr) = split(logps), split(lens), split(ref_logps)
    ours, _, _ = pl.preference_loss(loss_type, c, r, cl, rl, rc, rr, beta=beta, simpo_gamma=0.5)

    average = loss_type in ("ipo", "simpo", "orpo")
    trl_logps = CPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=False)
    assert torch.allclose(trl_logps.double(), logps.double(), atol=TOL)  # the same sequence log-probs
    if loss_type in ("sigmoid", "hinge", "ipo"):
        trl_ref = CPOTrainer.get_batch_logps(ref_logits, labels.clone(), average_log_prob=False)
        ratio = trl_logps - trl_ref
        if average:
            ratio = ratio / (labels[:, 1:] != -100).sum(-1)
        theirs, _, _ = CPOTrainer.cpo_loss(_trl_self(loss_type, beta), *split(ratio))
    elif loss_type == "simpo":
        avg = CPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=True)
        theirs, _, _ = CPOTrainer.cpo_loss(_trl_self("simpo", beta, gamma=0.5), *split(avg))
    else:
        avg = ORPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=True)
        ratio_term, _, _, _, _ = ORPOTrainer.odds_ratio_loss(_trl_self("orpo", beta), *split(avg))
        # TRL: loss = nll(chosen) - beta * logsigmoid(log odds); its nll is the chosen tokens' mean
        theirs = -split(avg)[0] - ratio_term
    assert torch.allclose(ours.double(), theirs.double(), atol=TOL), (ours, theirs)
