"""FSDP2 (torch fully_shard) through launch/fsdp2.yaml: train, checkpoint (SHARDED_STATE_DICT, one
DCP shard per rank), kill -9, resume_from_checkpoint=auto, export.

On CPU processes (ACCELERATE_USE_CPU=1) accelerate 1.15 alone would run the recipe as plain DDP;
notrainer's make_accelerator turns it into FSDP2 on gloo (loop._fsdp2_on_cpu), so this runs in CI.
The same test on 2 GPUs (bf16) carries the `gpu` mark."""

from __future__ import annotations

import os

import pytest

from conftest import REPO, read_results
from dist_helpers import fresh_eval_loss, finish, kill9_tree, slow_task_arg, start, wait_past_checkpoint

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow

STEPS, EVERY = 6, 3
ARGS = ["report_to=none", f"max_train_steps={STEPS}", f"checkpointing_steps={EVERY}", f"eval_steps={STEPS}",
        "per_device_train_batch_size=4"]
RECIPE = str(REPO / "launch" / "fsdp2.yaml")


def _cpu_env(**extra: str) -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **extra}


def _gpu_env(**extra: str) -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}, **extra}


def _kill9_resume_export(tmp_path, launch, env, args, rel, export_rel=1e-5):
    ref = tmp_path / "ref"
    assert "(FSDP)" in finish(start(launch, *args, f"output_dir={ref}", env=env()))
    assert len(list((ref / "checkpoints" / f"step_{EVERY}").rglob("*.distcp"))) >= 2, "sharded (DCP) checkpoint"

    out = tmp_path / "run"
    marker = tmp_path / "batches"
    proc = start(launch, *args, f"output_dir={out}", env=env(SLOW_STEP_SECONDS="0.5", SLOW_STEP_MARKER=str(marker)))
    wait_past_checkpoint(out, EVERY, marker, proc, batches=1, timeout=600)
    kill9_tree(proc)
    assert not (out / "all_results.json").exists()
    assert "resumed from" in finish(start(launch, *args, f"output_dir={out}", "resume_from_checkpoint=auto", env=env()))
    got, want = read_results(out), read_results(ref)
    assert got["global_step"] == want["global_step"]
    for key in ("train_loss", "eval_loss"):
        assert got[key] == pytest.approx(want[key], rel=rel), key
    # The export is the full model (gathered from the shards), evaluated by a fresh single process.
    assert fresh_eval_loss(out, tmp_path) == pytest.approx(got["eval_loss"], rel=export_rel)


def test_fsdp2_on_cpu_processes_trains_resumes_after_kill9_and_exports(tmp_path):
    launch = ["--config_file", RECIPE, "--num_processes", "2", "--mixed_precision", "no"]
    _kill9_resume_export(tmp_path, launch, _cpu_env, [slow_task_arg(tmp_path), *ARGS], rel=1e-6)


def test_fsdp1_on_cpu_processes_is_refused(tmp_path):
    recipe = tmp_path / "fsdp1.yaml"
    recipe.write_text((REPO / "launch" / "fsdp2.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    proc = start(["--config_file", str(recipe), "--num_processes", "2", "--mixed_precision", "no"], "task=clm",
                 *ARGS, f"output_dir={tmp_path / 'o'}", env=_cpu_env())
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "notrainer: error: FSDP1 does not run on CPU processes" in err, err[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 on GPUs needs 2 of them")
def test_fsdp2_on_gpus_trains_resumes_after_kill9_and_exports(tmp_path):
    launch = ["--config_file", RECIPE, "--num_processes", "2"]  # the recipe's bf16
    _kill9_resume_export(tmp_path, launch, _gpu_env, [slow_task_arg(tmp_path), *ARGS], rel=1e-3,
                         export_rel=2e-2)  # bf16 training, fp32 fresh evaluation
