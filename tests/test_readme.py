"""The README's examples run as written."""

from __future__ import annotations

import pytest

import os
import re
import subprocess
import sys

from tests.conftest import CPU_ENV, REPO, read_results


def _python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"README: expected one python block with {containing!r}"
    return found[0]


def _env() -> dict:
    return {**os.environ, **CPU_ENV, "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_the_subclass_example_runs(tmp_path):
    (tmp_path / "my_task.py").write_text(_python_block("class MyTask"))
    proc = subprocess.run([sys.executable, "-m", "notrainer.run", "task=my_task.py:MyTask", "max_train_steps=3",
                           "report_to=none", "output_dir=out"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_results(tmp_path / "out")["global_step"] == 3


@pytest.mark.slow
def test_the_reuse_example_runs_and_learns(tmp_path):
    code = _python_block("from notrainer import Loop")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 0.05  # it prints eval_loss
