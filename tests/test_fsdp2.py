"""FSDP2 (torch fully_shard) through launch/fsdp2.yaml: train, checkpoint (SHARDED_STATE_DICT),
kill -9, resume_from_checkpoint=auto, export. accelerate 1.15 only switches to FSDP from a
multi-accelerator process type, so on CPU processes the recipe would run as DDP (docs/distributed.md);
this test needs 2 GPUs (`gpu` mark)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, _free_port, read_results

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 through accelerate needs 2 GPUs"),
]

ARGS = ["task=clm", "report_to=none", "max_train_steps=12", "checkpointing_steps=4", "eval_steps=12",
        "per_device_train_batch_size=4", "mixed_precision=bf16"]


def _start(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "fsdp2.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "notrainer.run", *args]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    return subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return out + err


def test_fsdp2_trains_resumes_after_kill9_and_exports(tmp_path):
    import psutil

    ref = tmp_path / "ref"
    assert "(FSDP)" in _finish(_start(*ARGS, f"output_dir={ref}"))
    assert list((ref / "checkpoints" / "step_4").rglob("*.distcp")), "sharded (DCP) checkpoint"

    out = tmp_path / "run"
    proc = _start(*ARGS, f"output_dir={out}")
    marker = out / "checkpoints" / "step_4" / "COMPLETE"
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.communicate()
    if (out / "all_results.json").exists():
        pytest.skip("the run finished before the kill landed (GPU too fast for this window)")
    assert "resumed from" in _finish(_start(*ARGS, f"output_dir={out}", "resume_from_checkpoint=auto"))
    got, want = read_results(out), read_results(ref)
    assert got["global_step"] == want["global_step"]
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-3)  # bf16 on GPU

    fresh = subprocess.run([sys.executable, "-m", "notrainer.run", "task=clm", "mode=eval", "report_to=none",
                            "block_size=64", f"model_name_or_path={out}", f"output_dir={tmp_path / 'eval'}"],
                           cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert read_results(tmp_path / "eval")["eval_loss"] == pytest.approx(got["eval_loss"], rel=2e-2)
