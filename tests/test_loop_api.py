"""The Loop as a library inside someone else's program: teardown on every exit path, any batch
Mapping, settings as a LoopConfig or keyword arguments."""

from __future__ import annotations

import signal

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from notrainer import Loop
from notrainer.config import LoopConfig


def _regression(tmp_path, **settings):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    model = torch.nn.Linear(4, 1)
    return Loop(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=8),
                loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]), eval_loader=DataLoader(data, batch_size=8),
                output_dir=str(tmp_path), progress=False, export=False, **settings)


def test_an_error_in_metrics_restores_the_signal_handlers_and_closes_trackers(tmp_path):
    def handler(signum, frame):  # the host program's own handler
        pass

    before = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        loop = _regression(tmp_path, max_train_steps=4, eval_steps=2)

        def metrics_fn(outputs, loss):
            assert signal.getsignal(signal.SIGTERM) is not handler  # the loop's own handler is installed
            raise ValueError("a metric failed")

        loop.metrics_fn = metrics_fn
        with pytest.raises(ValueError, match="a metric failed"):
            loop.fit()
        for s in before:
            assert signal.getsignal(s) is handler
        assert loop.accelerator.trackers == []
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_settings_as_a_loop_config_or_keywords(tmp_path):
    loop = _regression(tmp_path, config=LoopConfig(max_train_steps=5, logging_steps=5), max_grad_norm=0.5)
    assert loop.max_train_steps == 5 and loop.config.max_grad_norm == 0.5 and loop.config.logging_steps == 5
    with pytest.raises(TypeError, match="did you mean max_train_steps"):
        _regression(tmp_path, max_train_step=5)


def test_loop_trains_on_a_transformers_collator_with_no_custom_functions(tmp_path):
    # DataCollatorWithPadding returns a BatchEncoding: a Mapping, not a dict.
    from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

    from notrainer.data.builtin import train_tokenizer

    texts = [("good fine great nice " * 3).strip(), ("bad awful poor sad " * 2).strip()] * 32
    labels = [0, 1] * 32
    tok = train_tokenizer(texts, vocab_size=60, style="bert")
    rows = [dict(tok(t), labels=y) for t, y in zip(texts, labels)]
    collate = DataCollatorWithPadding(tok)
    assert not isinstance(collate(rows[:2]), dict)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        pad_token_id=tok.pad_token_id)
    model = BertForSequenceClassification(config)
    loop = Loop(model, torch.optim.AdamW(model.parameters(), lr=1e-2), DataLoader(rows, batch_size=8, collate_fn=collate),
                eval_loader=DataLoader(rows, batch_size=16, collate_fn=collate), max_train_steps=16, logging_steps=4,
                output_dir=str(tmp_path), progress=False, export=False)
    results = loop.fit()
    assert results["eval_loss"] < 0.1
    # 16 steps of 8 rows: samples/s is rows, not the batch's number of keys
    assert results["train_samples_per_second"] == pytest.approx(16 * 8 / results["train_runtime"], rel=0.05)
