"""`notrainer launch`: accelerate's launcher in-process, so that a usage error ends in our one
line and the run's exit status, not in accelerate's CalledProcessError traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import CPU_ENV, REPO, _free_port
from notrainer.cli.launch import split_argv


def test_split_between_accelerate_options_and_the_run():
    assert split_argv(["--multi_gpu", "--num_processes", "2", "task=clm", "--learning_rate", "3e-4"]) == (
        ["--multi_gpu", "--num_processes", "2"], ["task=clm", "--learning_rate", "3e-4"])
    assert split_argv(["--config_file", "z3.yaml", "--", "--task", "sft"]) == (["--config_file", "z3.yaml"],
                                                                               ["--task", "sft"])


def _launch(*args: str) -> subprocess.CompletedProcess:
    # `notrainer launch ...` is the console entry for `python -m notrainer.run launch ...`.
    return subprocess.run([sys.executable, "-m", "notrainer.run", "launch", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", *args],
                          env={**os.environ, **CPU_ENV}, cwd=str(REPO), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_usage_error_under_the_launcher_is_one_line_and_exit_2(tmp_path):
    proc = _launch("--cpu", "--num_processes", "1", "task=clm", "learning_rate=-1", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["notrainer: error: learning_rate must be > 0, got -1.0"]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_usage_error_under_the_launcher_with_two_processes(tmp_path):
    proc = _launch("--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()), "task=clm",
                   "--learning_rate", "-1", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    # rank 0 prints the one line; torchrun adds its own log lines about the failed ranks, no traceback
    assert proc.stderr.count("notrainer: error: learning_rate must be > 0, got -1.0") == 1
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
