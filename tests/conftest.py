"""Shared test helpers: run the CLI in-process (fast) or as real processes (DDP, kill -9)."""

from __future__ import annotations

import contextlib
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


def pytest_collection_modifyitems(config, items):
    """`gpu` tests (the engines that cannot run on CPU processes) are skipped on a machine without
    CUDA, so the default run and CI pass; on a GPU machine `pytest -m gpu` runs them."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu mark)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def reset_accelerate_state() -> None:
    """accelerate keeps process-wide singletons; reset them so the next in-process run starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate_state()


@contextlib.contextmanager
def one_thread():
    """One torch thread, like the subprocess runs (OMP_NUM_THREADS=1): the thread count changes
    the order of float sums (hence the last bits of weights), and on a busy 2-core machine more
    threads only spin against each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread_per_module():
    with one_thread():
        yield


def run_cli(*args: str, output_dir: Path | None = None) -> dict:
    """Run `notrainer.cli.run` in this process; returns all_results.json (or the eval results)."""
    from notrainer.cli.run import run

    argv = list(args)
    if output_dir is not None:
        argv.append(f"output_dir={output_dir}")
    if not any(a.startswith("report_to=") for a in argv):
        argv.append("report_to=none")
    return run(argv)


#: environment of every subprocess run: CPU DDP, one thread per process
CPU_ENV = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def launch_command(target: list[str], num_processes: int = 1) -> list[str]:
    """The command that runs `target` (["-m", "notrainer.run", ...] or [script, ...]): plain
    python for one process, `accelerate launch` as CPU DDP for several."""
    if num_processes == 1:
        return [sys.executable, *target]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *target]


def cli_subprocess(*args: str, num_processes: int = 1, env: dict | None = None, timeout: int = 600,
                   check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI as a real process; with num_processes=2, as 2-process CPU DDP."""
    cmd = launch_command(["-m", "notrainer.run", *args], num_processes)
    proc = subprocess.run(cmd, env={**os.environ, **CPU_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))
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


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny llama + tokenizer saved to a folder (fp32 weights), as a user's base model would be
    (LoRA, QLoRA and adapter-checkpoint tests start from it)."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM

    from notrainer.data.builtin import tiny_config
    from notrainer.cli.run import parse_args

    cfg, task_cls = parse_args(["task=sft"])
    task = task_cls(cfg)
    tok = task.build_tokenizer(task.load_raw_datasets())
    set_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", tok))
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
