"""The package layout: nothing named bare `tasks` is installed, and the engine never imports a task."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.conftest import CPU_ENV, REPO, read_results


def test_cli_runs_from_a_folder_with_its_own_tasks_module_and_package(tmp_path):
    # invoke and celery projects keep a tasks.py (or a tasks/ package) in their working folder,
    # which comes first on sys.path.
    (tmp_path / "tasks.py").write_text("raise ImportError('the user project tasks.py was imported')\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("raise ImportError('the user project tasks/ was imported')\n")
    env = {**os.environ, **CPU_ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "notrainer.run", "task=clm", "max_train_steps=3", "report_to=none",
                           "output_dir=out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_results(tmp_path / "out")["global_step"] == 3


def test_engine_modules_import_without_any_task_module():
    # A finder that refuses every notrainer.tasks module: the loop, checkpoints and config must not need one.
    code = textwrap.dedent("""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "notrainer.tasks" or name.startswith("notrainer.tasks."):
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        import notrainer, notrainer.engine.loop, notrainer.engine.checkpoint, notrainer.config, notrainer.engine.guards
        import notrainer.engine.state, notrainer.engine.batch, notrainer.modeling.optim, notrainer.modeling.lora, notrainer.data.files
        assert not [m for m in sys.modules if m.startswith("notrainer.tasks")]
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **CPU_ENV})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
