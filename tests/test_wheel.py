"""A built wheel installs the task modules (the top-level tasks/ folder) as `notrainer.tasks`."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_wheel_installs_tasks_as_notrainer_tasks(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = glob.glob(str(dist / "notrainer-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "notrainer/tasks/clm.py" in names and "notrainer/engine/loop.py" in names
    assert not [n for n in names if n.startswith("tasks/")], "a bare top-level tasks package was packaged"

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), wheel],
                   check=True, capture_output=True, text=True, timeout=300)
    # Run from a folder with a user's own tasks.py, outside the checkout: the wheel's copy is imported.
    work = tmp_path / "work"
    work.mkdir()
    (work / "tasks.py").write_text("raise ImportError('the user tasks.py was imported')\n")
    code = ("import notrainer, notrainer.tasks.clm as clm; from notrainer.tasks.clm import CLMTask; "
            "print(notrainer.__file__); print(clm.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    package_file, task_file = proc.stdout.split()
    assert package_file.startswith(str(site)) and task_file.startswith(str(site)), proc.stdout
