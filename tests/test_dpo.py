"""task=dpo: the embedded default for every loss type, the three ways to get the reference
log-probs, gradient accumulation and 2 processes against one big batch, kill -9 resume with
precomputed reference log-probs, and DPO on notrainer's own SFT export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import CPU_ENV, REPO, cli_subprocess, read_results, run_cli
from notrainer.errors import UsageError


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def assert_close_weights(a, b, atol: float):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, worst


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "simpo", "orpo"])
@pytest.mark.slow
def test_default_learns_the_preference(tmp_path, loss_type):
    out = tmp_path / "run"
    run_cli("task=dpo", f"loss_type={loss_type}", output_dir=out)
    res = read_results(out)
    assert res["eval_rewards/accuracies"] >= 0.9, res
    if loss_type in ("simpo", "orpo"):  # no reference: the initial policy's margin, from an eval-only run
        start = run_cli("task=dpo", f"loss_type={loss_type}", "mode=eval", output_dir=tmp_path / "start")
        initial = start["eval_logps/margins"]
    else:  # the reference is the initial policy
        initial = res["eval_ref_logps/margins"]
        assert res["eval_rewards/margins"] > 0
    assert res["eval_logps/margins"] > initial + 1.0, (res["eval_logps/margins"], initial)


SHORT = ["task=dpo", "optim=sgd", "learning_rate=0.5", "max_train_steps=2", "do_eval=false", "lr_scheduler_type=constant"]


def test_accumulation_equals_one_big_batch(tmp_path):
    """SGD (Adam's first step would hide a wrong scale): 4 micro-batches of 2 pairs == 1 batch of 8."""
    run_cli(*SHORT, "per_device_train_batch_size=8", output_dir=tmp_path / "big")
    run_cli(*SHORT, "per_device_train_batch_size=2", "gradient_accumulation_steps=4", output_dir=tmp_path / "acc")
    assert_close_weights(tmp_path / "big", tmp_path / "acc", atol=2e-6)


def test_training_log_has_trls_reward_metrics(tmp_path):
    """rewards/* and logps/* in each training log record, as TRL logs them. At step 1 the policy
    is still the reference, so every implicit reward is exactly 0; then they move apart."""
    out = tmp_path / "run"
    run_cli("task=dpo", "max_train_steps=6", "logging_steps=1", "do_eval=false", output_dir=out)
    logged = [r for r in map(json.loads, (out / "log_history.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["step"] for r in logged] == list(range(1, 7))
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")
    for r in logged:
        assert all(n in r for n in names), r
        assert 0.0 <= r["rewards/accuracies"] <= 1.0
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
        assert r["logps/chosen"] < 0 and r["logps/rejected"] < 0
    assert logged[0]["rewards/chosen"] == 0.0 and logged[0]["rewards/margins"] == 0.0
    assert logged[-1]["rewards/margins"] > 0 and logged[-1]["rewards/accuracies"] > 0.5, logged[-1]


def test_precomputed_reference_equals_the_frozen_copy(tmp_path, capsys):
    run_cli(*SHORT, "per_device_train_batch_size=8", output_dir=tmp_path / "copy")
    run_cli(*SHORT, "per_device_train_batch_size=8", "precompute_ref_log_probs=true", output_dir=tmp_path / "pre")
    assert "reference log-probs: 600 train pairs computed" in capsys.readouterr().out
    assert (tmp_path / "pre" / "reference_logps" / "train.safetensors").exists()
    assert_close_weights(tmp_path / "copy", tmp_path / "pre", atol=2e-6)


@pytest.mark.slow
def test_lora_policy_uses_the_base_as_reference(tmp_path):
    out = tmp_path / "run"
    res = run_cli("task=dpo", "lora.r=8", "learning_rate=5e-3", output_dir=out)
    assert res["eval_rewards/accuracies"] >= 0.9, res
    assert res["eval_logps/margins"] > res["eval_ref_logps/margins"] + 1.0
    assert (out / "adapter_config.json").exists()


@pytest.mark.slow
def test_dpo_on_an_sft_export(tmp_path):
    """The pipeline: SFT on the chosen responses, then DPO from that run's output_dir."""
    from notrainer.tasks.preference import builtin_preferences

    train, val = builtin_preferences()
    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n" for r in train))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in train))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in val))
    run_cli("task=sft", f"train_file={sft_file}", "num_train_epochs=1", "do_eval=false", output_dir=tmp_path / "sft")
    res = run_cli("task=dpo", f"model_name_or_path={tmp_path / 'sft'}", f"train_file={pairs}",
                  f"validation_file={held}", "num_train_epochs=1", output_dir=tmp_path / "dpo")
    assert res["eval_rewards/accuracies"] >= 0.9, res
    assert res["eval_logps/margins"] > res["eval_ref_logps/margins"]


def test_bad_keys_are_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"loss_type='sigmod' is unknown \(did you mean sigmoid\?\)"):
        run_cli("task=dpo", "loss_type=sigmod", output_dir=tmp_path / "a")
    with pytest.raises(UsageError, match="precompute_ref_log_probs=true: loss_type=simpo uses no reference model"):
        run_cli("task=dpo", "loss_type=simpo", "precompute_ref_log_probs=true", output_dir=tmp_path / "b")
    with pytest.raises(UsageError, match="label_smoothing applies to loss_type=sigmoid or simpo"):
        run_cli("task=dpo", "loss_type=ipo", "label_smoothing=0.1", output_dir=tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------- processes (slow)

SLOW_DPO = '''
import os, time
from notrainer.tasks.dpo import DPOTask

class SlowDPO(DPOTask):
    def loss(self, model, batch):
        time.sleep(float(os.environ.get("SLOW_STEP_SECONDS", "0")))
        return super().loss(model, batch)
'''


@pytest.mark.slow
def test_kill9_resume_is_exact_with_precomputed_reference(tmp_path):
    from dist_helpers import kill9_tree, wait_for

    task_file = tmp_path / "slow_dpo.py"
    task_file.write_text(SLOW_DPO)
    args = [f"task={task_file}:SlowDPO", "precompute_ref_log_probs=true", "max_train_steps=8",
            "checkpointing_steps=3", "per_device_train_batch_size=4", "do_eval=false", "report_to=none"]
    env = {**os.environ, **CPU_ENV}
    ref = cli_subprocess(*args, f"output_dir={tmp_path / 'straight'}", timeout=600)
    assert "train pairs computed" in ref.stdout

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "notrainer.run", *args, f"output_dir={out}"],
                            env={**env, "SLOW_STEP_SECONDS": "1.0"}, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoints" / "step_3", proc, timeout=400)
    kill9_tree(proc)
    assert not (out / "model.safetensors").exists()
    resumed = cli_subprocess(*args, f"output_dir={out}", "resume_from_checkpoint=auto", timeout=600)
    assert "train pairs read from" in resumed.stdout and "computed" not in resumed.stdout, resumed.stdout[-2000:]
    a, b = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_equal_one_big_batch(tmp_path):
    cli_subprocess(*SHORT, "per_device_train_batch_size=8", "report_to=none", f"output_dir={tmp_path / 'one'}")
    cli_subprocess(*SHORT, "per_device_train_batch_size=2", "gradient_accumulation_steps=2", "report_to=none",
                   f"output_dir={tmp_path / 'two'}", num_processes=2)
    assert_close_weights(tmp_path / "one", tmp_path / "two", atol=2e-6)
