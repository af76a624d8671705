"""Multi-node on one machine: two `accelerate launch` commands (--num_machines 2, one CPU
process per "node", rendezvous on 127.0.0.1) train, checkpoint and resume task=clm; the result
equals the single-machine 2-process run, and only the global main process writes the results
and the export."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import CPU_ENV, REPO, _free_port, cli_subprocess, read_results

pytestmark = pytest.mark.slow
ARGS = ["task=clm", "report_to=none", "max_train_steps=4", "checkpointing_steps=2", "eval_steps=4"]


def _two_nodes(*args: str, timeout: int = 300) -> list[str]:
    port = str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
         "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "notrainer.run", *args],
        env={**os.environ, **CPU_ENV}, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    logs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-3000:]}"
            logs.append(out + err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return logs


def test_two_nodes_on_one_machine_train_checkpoint_and_resume(tmp_path):
    single = tmp_path / "single"
    cli_subprocess(*ARGS, f"output_dir={single}", num_processes=2)

    out = tmp_path / "nodes"
    _two_nodes(*ARGS, f"output_dir={out}")
    assert read_results(out)["eval_loss"] == pytest.approx(read_results(single)["eval_loss"], rel=1e-6)
    step = out / "checkpoints" / "step_2"
    # per-rank state from both nodes, the rest once
    assert {p.name for p in step.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert (step / "COMPLETE").is_file() and (out / "model.safetensors").is_file()

    # resume from step 2 on both nodes: the same end as the uninterrupted run
    want = read_results(out)
    shutil.rmtree(out / "checkpoints" / "step_4")
    (out / "all_results.json").unlink()
    (out / "model.safetensors").unlink()
    logs = _two_nodes(*ARGS, f"output_dir={out}", "resume_from_checkpoint=auto")
    assert all("resumed from" in log for log in logs)
    got = read_results(out)
    assert {k: got[k] for k in ("global_step", "train_loss", "eval_loss")} == \
        {k: want[k] for k in ("global_step", "train_loss", "eval_loss")}
