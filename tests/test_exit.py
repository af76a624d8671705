"""Every 2-process run ends: the explicit teardown (barriers, trackers closed, wrapped objects
released, process group destroyed) leaves no rank alive in gloo's destructor. The 2-process CLI
runs 10 times in a row under a tight per-run timeout; each exits with its expected status."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import CPU_ENV, REPO, launch_command

pytestmark = pytest.mark.slow
RUNS, PER_RUN_TIMEOUT = 10, 120  # a run takes ~25 s on a busy 2-core machine; a hang takes forever


def _run(*args: str) -> subprocess.CompletedProcess:
    cmd = launch_command(["-m", "notrainer.run", "task=clm", "report_to=none", *args], num_processes=2)
    proc = subprocess.Popen(cmd, env={**os.environ, **CPU_ENV}, cwd=str(REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=PER_RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        import psutil  # a dependency of accelerate

        stuck = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in stuck:  # the launcher and its ranks (a hung rank would outlive the launcher)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.communicate()
        raise AssertionError(f"a 2-process run did not exit within {PER_RUN_TIMEOUT} s: {' '.join(cmd)}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ten_two_process_runs_in_a_row_all_exit(tmp_path):
    for i in range(RUNS):
        out = tmp_path / f"run{i}"
        proc = _run("max_train_steps=4", "eval_steps=4", "per_device_train_batch_size=4", f"output_dir={out}")
        assert proc.returncode == 0, f"run {i}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert (out / "all_results.json").is_file()


def test_a_usage_error_on_two_processes_exits_2(tmp_path):
    proc = _run("max_train_steps=-1", f"output_dir={tmp_path / 'o'}")
    assert proc.returncode != 0  # accelerate launch reports a failed rank as 1; the ranks exit 2
    assert "notrainer: error:" in proc.stderr
