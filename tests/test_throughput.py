"""Throughput accounting (notrainer.observability.throughput) and the loop's samples/s, MFU and memory reports."""

from __future__ import annotations

import math

import pytest
import torch

from notrainer.engine.batch import batch_shape

from notrainer.observability import throughput
from notrainer.errors import UsageError
from tests.conftest import run_cli


def _on_meta(model_type: str, **kwargs):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: a 0.5B model costs nothing to build
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))


def test_gpt2_124m_flops_per_token():
    model = _on_meta("gpt2")  # the defaults are GPT-2 small: 12 x 768, vocab 50257, 1024 positions
    d, layers, vocab, positions = 768, 12, 50257, 1024
    per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    total = vocab * d + positions * d + layers * per_layer + 2 * d
    assert total == 124_439_808  # the well-known GPT-2 small parameter count
    # Embedding lookups cost no FLOPs, but the tied lm_head is a matmul: total minus wpe.
    assert throughput.matmul_params(model) == total - positions * d == 123_653_376
    assert throughput.attention_shape(model.config) == (12, 768)
    assert throughput.flops_per_token(model, 1024) == 6 * 123_653_376 + 12 * 12 * 1024 * 768 == 855_166_464


def test_qwen2_05b_shape_flops_per_token():
    model = _on_meta("qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    # Qwen2-0.5B has 494,032,768 parameters; its embedding is tied to the head, so all of them
    # take part in a matmul.
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert throughput.matmul_params(model) == 494_032_768
    assert throughput.flops_per_token(model, 2048) == 6 * 494_032_768 + 12 * 24 * 2048 * 896


def test_untied_head_counts_once_and_embedding_never():
    model = _on_meta("llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    total = sum(p.numel() for p in model.parameters())
    assert throughput.matmul_params(model) == total - 1000 * 64


def test_mfu_and_peak_table():
    assert throughput.mfu(1e5, 1e9, 1000.0) == pytest.approx(0.1)
    assert throughput.mfu(1e5, 1e9, 1000.0, num_devices=4) == pytest.approx(0.025)
    assert throughput.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert throughput.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert throughput.peak_tflops_for("NVIDIA H200") == 989.0
    assert throughput.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert throughput.peak_tflops_for("NVIDIA A10G") == 70.0
    assert throughput.peak_tflops_for("NVIDIA L40S") == 362.0
    assert throughput.peak_tflops_for("NVIDIA L4") == 121.0
    assert throughput.peak_tflops_for("Some Future Accelerator") is None


def test_meter_report_and_override():
    model = _on_meta("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=128)
    fpt = throughput.flops_per_token(model, 128)
    meter = throughput.Meter(model, peak_tflops=2.0, device="cpu")
    out = meter.report(tokens=4096, samples=32, seconds=2.0, seq_len=128, num_processes=2)
    assert out["samples_per_second"] == 16.0
    assert out["mfu"] == pytest.approx(2048 * fpt / (2.0e12 * 2))
    assert "peak_memory_gib" not in out  # CPU: no allocator statistics
    # without a peak (CPU, no override) there is no MFU, and nothing pretends otherwise
    assert "mfu" not in throughput.Meter(model, device="cpu").report(4096, 32, 2.0, 128)


def test_batch_shape_reads_shapes_only():
    assert batch_shape({"input_ids": torch.zeros(3, 17, dtype=torch.long)}) == (3, 17)
    assert batch_shape([torch.zeros(5, 2), torch.zeros(5)]) == (5, 2)
    assert batch_shape({"x": torch.zeros(4)}) == (4, 0)


def test_bad_peak_tflops_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="peak_tflops must be > 0"):
        run_cli("task=clm", "peak_tflops=0", output_dir=tmp_path)


def test_cli_fast_path_on_cpu_reports_sane_throughput(tmp_path):
    """The GPU fast setting minus compile (bf16 autocast + chunked loss) runs on CPU, learns,
    and reports samples/s and an MFU that follows from tokens/s and the model's FLOPs."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fast"
    res = run_cli("task=clm", "mixed_precision=bf16", "chunked_loss=true", "peak_tflops=0.5", "max_train_steps=4",
                  "logging_steps=2", "max_eval_samples=8", "per_device_train_batch_size=4", output_dir=out)
    assert math.isfinite(res["train_loss"]) and math.isfinite(res["eval_loss"])
    assert res["eval_loss"] < math.log(1000)  # better than a uniform guess over the vocabulary
    # packed blocks of 64 tokens: samples/s is tokens/s over 64
    assert res["train_samples_per_second"] == pytest.approx(res["train_tokens_per_second"] / 64, rel=1e-3)
    model = AutoModelForCausalLM.from_pretrained(out)
    expected = res["train_tokens_per_second"] * throughput.flops_per_token(model, 64) / 0.5e12
    assert res["train_mfu"] == pytest.approx(expected, rel=1e-3)


def test_loop_keeps_no_output_alive_into_the_next_step(tmp_path):
    """A step's outputs (logits, activations) are gone before the next step's forward: a held
    `outputs` doubles peak memory on a large-vocabulary model."""
    import weakref

    from torch.utils.data import DataLoader

    from notrainer import Loop

    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 4))
    data = [(torch.randn(8), torch.tensor(i % 4)) for i in range(32)]
    alive_at_next_forward = []
    previous: list[weakref.ref] = []

    def loss_fn(m, batch):
        alive_at_next_forward.append(sum(r() is not None for r in previous))
        previous.clear()
        logits = m(batch[0])
        loss = torch.nn.functional.cross_entropy(logits, batch[1])
        previous.extend([weakref.ref(logits), weakref.ref(loss)])  # the loss tensor is all the loop gets
        return loss

    loop = Loop(model, torch.optim.AdamW(model.parameters()), DataLoader(data, batch_size=4), loss_fn=loss_fn,
                gradient_accumulation_steps=2, max_train_steps=4, logging_steps=2, output_dir=str(tmp_path),
                export=False, progress=False)
    loop.fit()
    assert len(alive_at_next_forward) == 8 and sum(alive_at_next_forward) == 0
