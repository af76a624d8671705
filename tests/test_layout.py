"""The package layout: nothing named bare `tasks` is installed, and the engine never imports a task."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
import textwrap

from tests.conftest import CPU_ENV, REPO, read_results


@pytest.mark.slow
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


@pytest.mark.slow
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


# Imports go down this order only; modules of one rank never import each other's folders
# (data, modeling, observability and metrics are independent of one another).
LAYERS = {"base": 0, "data": 1, "modeling": 1, "observability": 1, "metrics": 1, "engine": 2, "config": 3,
          "tasks": 4, "cli": 5, "entry": 6}


def _module_layer(name: str) -> str:
    parts = name.split(".")
    if name == "notrainer" or name == "notrainer.run":
        return "entry"
    if parts[1] in ("errors", "imports", "compat"):
        return "base"
    return parts[1]


def _imports_by_module() -> dict[str, set[str]]:
    import ast

    files = {}
    for folder, package in (("notrainer", "notrainer"), ("tasks", "notrainer.tasks")):
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("").parts
            rel = rel[:-1] if rel[-1] == "__init__" else rel
            files[".".join((package, *rel))] = path
    edges = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every import, also those inside functions
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = (base + ("." + node.module if node.module else "")) if node.level else node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            named = {c for c in candidates[1:] if c in files}  # `from pkg import module` imports the module
            found |= {c for c in (named or candidates[:1]) if c in files and c != name}
        edges[name] = found
    return edges


def test_imports_only_go_down_the_layers_and_form_no_cycle():
    edges = _imports_by_module()
    wrong = []
    for module, targets in edges.items():
        for target in targets:
            if target.startswith(module + ".") or module == "notrainer":
                continue  # a package's __init__ may re-export its own modules
            a, b = _module_layer(module), _module_layer(target)
            if a != b and LAYERS[b] >= LAYERS[a]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layer order (docs/architecture.md): " + ", ".join(sorted(wrong))

    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for target in edges[module]:
            if target.startswith(module + ".") or module.startswith(target + ".") or target == "notrainer":
                continue
            assert state.get(target) != 1, "import cycle: " + " -> ".join(path[path.index(target):] + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in edges:
        if module not in state:
            visit(module, [module])
