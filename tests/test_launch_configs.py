"""launch/: every accelerate recipe parses through accelerate's own launcher code into the
settings it promises; the 2-process CPU recipe really runs (SFT + LoRA + packing, 2 ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, _free_port, run_cli

LAUNCH = REPO / "launch"
RECIPES = ["single_gpu", "multi_gpu", "multi_node", "cpu_ddp", "deepspeed_zero2", "deepspeed_zero3",
           "deepspeed_zero3_offload", "fsdp2"]


def _launch_env(name: str, monkeypatch) -> tuple:
    """What `accelerate launch --config_file launch/<name>.yaml` would hand its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    monkeypatch.chdir(REPO)  # file paths inside the recipes are relative to the repository
    args = launch_command_parser().parse_args(["--config_file", str(LAUNCH / f"{name}.yaml"), "-m", "notrainer.run"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate.commands.launch.launch_command builds it
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config.keys())
        if mp_from_config:  # with a deepspeed_config_file, DeepSpeedPlugin() refuses it
            args.deepspeed_fields_from_accelerate_config.append("mixed_precision")
        args.deepspeed_fields_from_accelerate_config = ",".join(args.deepspeed_fields_from_accelerate_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    return args, defaults


def test_the_recipes_are_all_there_and_commented():
    names = sorted(p.stem for p in LAUNCH.glob("*.yaml"))
    assert names == sorted(RECIPES)
    for name in RECIPES:
        text = (LAUNCH / f"{name}.yaml").read_text()
        assert text.startswith("#") and "accelerate launch" in text, name


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_passes_accelerate_launch_validation(name, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(LAUNCH / f"{name}.yaml"))  # accelerate's own schema (ClusterConfig)
    args, _ = _launch_env(name, monkeypatch)
    expected = {"single_gpu": 1, "cpu_ddp": 2, "multi_node": 16}.get(name, 8)
    assert args.num_processes == config.num_processes == expected
    # Every key of a nested section is one accelerate's launcher knows.
    for section, prefix in (("deepspeed_config", ""), ("fsdp_config", "")):
        for key in getattr(config, section) or {}:
            assert hasattr(args, prefix + key), f"{name}: {section}.{key} is not an accelerate setting"


@pytest.mark.parametrize("name, stage, offload, gather16", [
    ("deepspeed_zero2", 2, "none", False),
    ("deepspeed_zero3", 3, "none", True),
    ("deepspeed_zero3_offload", 3, "cpu", True),
])
def test_deepspeed_recipes_give_the_promised_zero_config(name, stage, offload, gather16, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    _launch_env(name, monkeypatch)
    plugin = DeepSpeedPlugin()  # reads the environment the launcher prepared, as each process would
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_param"]["device"] == offload and zero["offload_optimizer"]["device"] == offload
    assert bool(zero.get("stage3_gather_16bit_weights_on_model_save")) is gather16
    # What notrainer.cli.run.check_distributed reads: the recipe is not refused.
    assert plugin.zero_stage == stage and bool(plugin.zero3_save_16bit_model) is gather16
    assert plugin.gradient_accumulation_steps == "auto"  # filled in from notrainer's gradient_accumulation_steps
    if stage == 3:
        assert plugin.zero3_init_flag is True
    if offload == "cpu":  # the precision is in the JSON file (accelerate refuses the yaml key beside it)
        assert plugin.deepspeed_config["bf16"]["enabled"] is True
        # no zero_force_ds_cpu_optimizer: notrainer's default there is DeepSpeedCPUAdam, and it sets
        # the key false itself so that accelerate keeps the optimizer optim= names
        assert "zero_force_ds_cpu_optimizer" not in plugin.deepspeed_config


def test_fsdp2_recipe_is_full_shard_with_transformer_layer_wrap(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    _launch_env("fsdp2", monkeypatch)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's FULL_SHARD
    assert "transformer" in getattr(plugin.auto_wrap_policy, "__name__", str(plugin.auto_wrap_policy))
    assert str(plugin.state_dict_type).endswith("SHARDED_STATE_DICT")


def test_slurm_script_is_valid_bash_and_uses_the_multi_node_recipe():
    script = LAUNCH / "slurm_multi_node.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "launch/multi_node.yaml" in text and "--machine_rank" in text and "resume_from_checkpoint=auto" in text


@pytest.mark.slow
def test_cpu_ddp_recipe_runs_two_processes(tmp_path):
    """SFT + LoRA + packing on 2 CPU ranks through launch/cpu_ddp.yaml; the merged export,
    evaluated in one process, gives the eval_loss the 2 ranks gathered (50 eval examples: the
    last batch is uneven, so a duplicated tail would show)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "cpu_ddp.yaml"),
           "--main_process_port", str(_free_port()), "-m", "notrainer.run", "task=sft", "lora.r=4", "lora.merge=true",
           "packing=true", "max_train_steps=3", "max_train_samples=96", "max_eval_samples=50",
           "per_device_eval_batch_size=16", "report_to=none", "logging_steps=1000", f"output_dir={out}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training on 2 process(es)" in proc.stdout + proc.stderr
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 3
    assert (out / "adapter_model.safetensors").is_file() and (out / "merged" / "model.safetensors").is_file()

    single = run_cli("task=sft", f"model_name_or_path={out / 'merged'}", "do_train=false", "packing=true",
                     "max_train_samples=96", "max_eval_samples=50", output_dir=tmp_path / "eval")
    assert abs(single["eval_loss"] - results["eval_loss"]) < 1e-5


def test_processes_that_do_not_see_each_other_are_refused(tmp_path, monkeypatch):
    """torchrun started 2 processes but accelerate sees 1 (CPU without ACCELERATE_USE_CPU=1):
    2 independent runs would race on output_dir, so the run stops before anything is written."""
    from notrainer.errors import UsageError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="2 processes were launched but accelerate sees 1; on CPU, launch with "
                                         "ACCELERATE_USE_CPU=1"):
        run_cli("task=sft", output_dir=tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("stage, gather16, refused", [(3, False, True), (3, True, False), (2, False, False)])
def test_zero3_without_16bit_gather_is_refused_before_training(stage, gather16, refused, monkeypatch):
    """DeepSpeed is not installed here, so the check runs on a stand-in for the accelerator."""
    from types import SimpleNamespace

    from notrainer.errors import UsageError
    from notrainer.cli.run import check_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    plugin = SimpleNamespace(zero_stage=stage, zero3_save_16bit_model=gather16)
    acc = SimpleNamespace(num_processes=1, state=SimpleNamespace(deepspeed_plugin=plugin))
    if refused:
        with pytest.raises(UsageError, match="zero3_save_16bit_model"):
            check_distributed(acc)
    else:
        check_distributed(acc)
