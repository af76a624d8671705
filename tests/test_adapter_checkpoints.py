"""Adapter-only checkpoints (notrainer/modeling/adapter_checkpoints.py): a LoRA run's checkpoints hold the
trainable tensors only, name and fingerprint the frozen base, refuse to resume on another base,
and a run killed with SIGKILL resumes to the same adapter, bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from notrainer.errors import UsageError

from conftest import one_thread, run_cli
from test_resume import ARGS, EVERY, SLOW_TASK, _kill9_between_checkpoints

FAST = ("max_train_samples=64", "max_eval_samples=16", "logging_steps=1000")


def _keys(file) -> list[str]:
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


@pytest.mark.slow
def test_a_lora_checkpoint_holds_no_frozen_base_weights(base_folder, tmp_path):
    out = tmp_path / "run"
    run_cli("task=sft", f"model_name_or_path={base_folder}", "lora.r=8", "max_train_steps=2",
            "checkpointing_steps=2", *FAST, output_dir=out)
    ckpt = out / "checkpoints" / "step_2"
    keys = _keys(ckpt / "model.safetensors")
    base_keys = _keys(base_folder / "model.safetensors")
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert not any(k.endswith(b) for k in keys for b in base_keys)  # no base tensor under any prefix
    # q_proj and v_proj (peft's llama default) in each layer, A and B each
    layers = sum(1 for k in base_keys if k.endswith("self_attn.q_proj.weight"))
    assert len(keys) == layers * 2 * 2
    assert (ckpt / "model.safetensors").stat().st_size < (base_folder / "model.safetensors").stat().st_size / 10
    base = json.loads((ckpt / "base_model.json").read_text())
    assert base["base_model"] == str(base_folder) and len(base["fingerprint"]) == 64
    assert "base_model.json" in json.loads((ckpt / "COMPLETE").read_text())["files"]
    # the optimizer state covers the adapters only, too
    state = torch.load(ckpt / "optimizer.bin", weights_only=True)["state"]
    assert len(state) == len(keys)


def test_resuming_adapters_on_another_base_is_refused(base_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(base_folder, base)
    common = ("task=sft", f"model_name_or_path={base}", "lora.r=4", *FAST)
    run_cli(*common, "max_train_steps=2", "checkpointing_steps=2", output_dir=tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        next(model.parameters()).mul_(2)  # same shapes and names, other weights
    model.save_pretrained(base)
    with pytest.raises(UsageError, match="holds adapters only, trained on another base model .its files changed"):
        run_cli(*common, "max_train_steps=4", "resume_from_checkpoint=auto", output_dir=tmp_path / "run")


@pytest.mark.slow
def test_kill9_then_auto_resume_of_a_lora_run_is_bitwise_equal(tmp_path, capsys):
    """The kill -9 test of tests/test_resume.py with LoRA (a random-init gpt2 base, dropout on):
    the resumed run loads an adapter-only checkpoint and ends with the uninterrupted run's adapter."""
    task_file = tmp_path / "slow_task.py"
    task_file.write_text(SLOW_TASK)
    args = [f"task={task_file}:SlowCLM", *ARGS, "lora.r=4"]
    ref = tmp_path / "ref"
    with one_thread():
        run_cli(*args, output_dir=ref)
    out = tmp_path / "run"
    _kill9_between_checkpoints([*args, f"output_dir={out}"], out, num_processes=1)
    ckpt = out / "checkpoints" / f"step_{EVERY}"
    assert all("lora_" in k for k in _keys(ckpt / "model.safetensors"))
    assert json.loads((ckpt / "base_model.json").read_text())["base_model"] is None  # built from a config
    with one_thread():
        run_cli(*args, "resume_from_checkpoint=auto", output_dir=out)
    assert f"resumed from {ckpt}" in capsys.readouterr().out
    for name in ("adapter_model.safetensors", "base_model/model.safetensors"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert json.loads((out / "all_results.json").read_text())["global_step"] == \
        json.loads((ref / "all_results.json").read_text())["global_step"]


@pytest.mark.slow
def test_a_lora_run_resumes_bitwise_under_ddp(tmp_path):
    """2-process CPU DDP: the adapter-only checkpoint of step 2, resumed, ends with the
    uninterrupted run's adapter, byte for byte."""
    from conftest import cli_subprocess

    args = ("task=clm", "lora.r=4", "max_train_steps=4", "checkpointing_steps=2", "report_to=none", *FAST)
    ref, out = tmp_path / "ref", tmp_path / "run"
    cli_subprocess(*args, f"output_dir={ref}", num_processes=2)
    assert all("lora_" in k for k in _keys(ref / "checkpoints" / "step_2" / "model.safetensors"))
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step_2", out / "checkpoints" / "step_2")
    proc = cli_subprocess(*args, f"output_dir={out}", "resume_from_checkpoint=auto", num_processes=2)
    assert "resumed from" in proc.stdout + proc.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == (ref / "adapter_model.safetensors").read_bytes()
