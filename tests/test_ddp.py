"""Real 2-process DDP on CPU: the schedule and the training both match 1 process."""

import json
import os
import subprocess

import pytest

from conftest import CPU_ENV, REPO, cli_subprocess, launch_command, read_results


def _launch_script(script, *args, num_processes):
    cmd = launch_command([str(REPO / "tests" / "scripts" / script), *args], num_processes)
    proc = subprocess.run(cmd, env={**os.environ, **CPU_ENV}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LRS="))
    return json.loads(line[4:])


@pytest.mark.slow
def test_lr_schedule_is_the_same_for_any_number_of_processes(tmp_path):
    one = _launch_script("lr_schedule.py", str(tmp_path / "one"), num_processes=1)
    two = _launch_script("lr_schedule.py", str(tmp_path / "two"), num_processes=2)
    assert (one["processes"], two["processes"]) == (1, 2)
    # linear warmup over 3 steps to 0.1, then linear decay to 0 at step 10: one value per step
    expected = [0.0, 0.1 / 3, 0.2 / 3] + [0.1 * (10 - s) / 7 for s in range(3, 10)]
    assert one["lrs"] == pytest.approx(expected)
    assert two["lrs"] == pytest.approx(expected)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    common = ["task=clm", "max_train_steps=30", "report_to=none", "eval_steps=30"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    cli_subprocess(*common, "per_device_train_batch_size=16", f"output_dir={one}")
    proc = cli_subprocess(*common, "per_device_train_batch_size=8", f"output_dir={two}", num_processes=2)
    assert "training on 2 process(es)" in proc.stdout + proc.stderr
    r1, r2 = read_results(one), read_results(two)
    assert r1["global_step"] == r2["global_step"] == 30
    # Same samples in every optimizer step; only dropout noise differs between the two runs.
    assert r2["eval_loss"] == pytest.approx(r1["eval_loss"], rel=0.03)
    assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=0.03)
    assert r1["eval_perplexity"] < 15
