"""Shared test helpers: run the CLI in-process (fast) or as real processes (DDP, kill -9)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never touch the network and never wait on the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; reset them so each in-process run starts clean."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_cli(*args: str, output_dir: Path | None = None) -> dict:
    """Run `notrainer.run` in this process; returns all_results.json (or the eval results)."""
    from notrainer.run import run

    argv = list(args)
    if output_dir is not None:
        argv.append(f"output_dir={output_dir}")
    if not any(a.startswith("report_to=") for a in argv):
        argv.append("report_to=none")
    return run(argv)


def cli_subprocess(*args: str, num_processes: int = 1, env: dict | None = None, timeout: int = 600,
                   check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI as a real process; with num_processes=2, as 2-process CPU DDP."""
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    if num_processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "notrainer.run", *args]
    else:
        cmd = [sys.executable, "-m", "notrainer.run", *args]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def read_results(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "all_results.json").read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
