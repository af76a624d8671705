"""task=dpo's frozen reference copy under the sharding engines, on 2 CPU processes: the engine
shards it like the policy (each process holds half of its weights) and the results equal those of
an unsharded reference.

- DeepSpeed ZeRO-3: the frozen copy runs as an inference-only DeepSpeed engine. The reference
  without sharding is the same run with precompute_ref_log_probs=true (its one pass runs on the
  full, gathered weights before training).
- FSDP2: the frozen copy is fully_shard-ed with the recipe's wrap policy; the reference is one
  process with the same global batch."""

from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import REPO, read_results, run_cli
from dist_helpers import finish, start

pytestmark = pytest.mark.slow

ARGS = ["task=dpo", "max_train_steps=4", "eval_steps=4", "report_to=none"]
METRICS = ("eval_ref_logps/margins", "eval_logps/margins", "eval_rewards/margins", "eval_rewards/chosen", "eval_loss")
ZERO3 = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
main_training_function: main
rdzv_backend: static
same_network: true
use_cpu: false
deepspeed_config:
  zero_stage: 3
  offload_optimizer_device: none
  offload_param_device: none
  zero3_save_16bit_model: true
  zero3_init_flag: false
"""


def assert_same(got: dict, want: dict) -> None:
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (the test extra)")
def test_zero3_shards_the_frozen_reference_and_matches_the_precomputed_one(tmp_path):
    recipe = tmp_path / "zero3.yaml"
    recipe.write_text(ZERO3)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # it would turn ZeRO-3 into DDP
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    launch = ["--config_file", str(recipe)]
    log = finish(start(launch, *ARGS, "per_device_train_batch_size=8", f"output_dir={tmp_path / 'copy'}", env=env))
    assert "frozen model ref_model: 50% of its weights on each process" in log
    log = finish(start(launch, *ARGS, "per_device_train_batch_size=8", "precompute_ref_log_probs=true",
                       f"output_dir={tmp_path / 'pre'}", env=env))
    assert "frozen model" not in log and "600 train pairs computed" in log
    assert_same(read_results(tmp_path / "copy"), read_results(tmp_path / "pre"))


def test_fsdp2_shards_the_frozen_reference_and_matches_one_process(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = ["--config_file", str(REPO / "launch" / "fsdp2.yaml"), "--num_processes", "2", "--mixed_precision", "no"]
    log = finish(start(launch, *ARGS, "per_device_train_batch_size=8", f"output_dir={tmp_path / 'fsdp'}", env=env))
    assert "frozen model ref_model: 50% of its weights on each process" in log and "(FSDP)" in log
    run_cli(*ARGS, "per_device_train_batch_size=16", output_dir=tmp_path / "one")
    assert_same(read_results(tmp_path / "fsdp"), read_results(tmp_path / "one"))
