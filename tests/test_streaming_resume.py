"""streaming=true runs killed with kill -9 between checkpoints and resumed with
resume_from_checkpoint=auto end with final weights bitwise equal to the uninterrupted run's
(CPU fp32, gradient accumulation 2, a shuffle buffer), on 1 and 2 processes, with 0 and 2
DataLoader workers: the data position in the checkpoint is exact."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from test_resume import EVERY, SLOW_TASK, _kill9_between_checkpoints, _start

STEPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """8 gzip shards (2 processes x 2 workers each read whole files)."""
    from notrainer.tasks.clm import builtin_corpus

    folder = tmp_path_factory.mktemp("corpus")
    docs = builtin_corpus(320, seed=7)
    for s in range(8):
        rows = "".join(json.dumps({"text": d}) + "\n" for d in docs[s * 40:(s + 1) * 40])
        (folder / f"part-{s:02d}.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    return str(folder)


@pytest.fixture(scope="module")
def slow_task(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("task") / "slow_task.py"
    path.write_text(SLOW_TASK)
    return f"task={path}:SlowCLM"


def _finish(args: list[str], processes: int) -> None:
    proc = _start(args, processes, slow=0)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


@pytest.mark.parametrize("processes, workers", [
    (1, 0), (1, 2),
    pytest.param(2, 0, marks=pytest.mark.slow), pytest.param(2, 2, marks=pytest.mark.slow),
])
@pytest.mark.slow
def test_streaming_kill9_then_auto_resume_is_bitwise_equal(slow_task, corpus, tmp_path, processes, workers):
    args = [slow_task, "streaming=true", f"train_file={corpus}", "shuffle_buffer_size=16",
            f"dataloader_num_workers={workers}", "report_to=none", "progress=false", f"max_train_steps={STEPS}",
            f"checkpointing_steps={EVERY}", "gradient_accumulation_steps=2", "per_device_train_batch_size=4",
            "block_size=32", "logging_steps=3"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    _finish([*args, f"output_dir={ref}"], processes)
    _kill9_between_checkpoints([*args, f"output_dir={out}"], out, num_processes=processes)
    _finish([*args, f"output_dir={out}", "resume_from_checkpoint=auto"], processes)
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    got, want = (json.loads((p / "all_results.json").read_text()) for p in (out, ref))
    assert (got["global_step"], got["train_loss"]) == (want["global_step"], want["train_loss"])
    assert (Path(out) / "checkpoints" / f"step_{STEPS}" / "loader_state_0.pt").exists()


@pytest.mark.slow
def test_a_shard_that_breaks_on_one_rank_is_named_and_the_checkpoints_stay_whole(tmp_path):
    """Only the rank that reads the broken shard knows of it: it prints the one line; the other
    rank loses its peer (accelerate's launcher then exits non-zero)."""
    from notrainer.engine.checkpoint import list_checkpoints, verify

    from conftest import cli_subprocess
    from test_streaming import _docs, _jsonl_shards

    docs = [{"text": d} for d in _docs(4000, seed=8)]
    train = _jsonl_shards(tmp_path / "train", docs, 4)  # rank 1 reads part-001 and part-003
    broken = tmp_path / "train" / "part-003.jsonl.gz"
    broken.write_bytes(broken.read_bytes()[:-30])
    out = tmp_path / "run"
    proc = cli_subprocess("task=clm", "streaming=true", f"train_file={train}", "max_train_steps=500",
                          "checkpointing_steps=2", "block_size=64", "per_device_train_batch_size=16",
                          "report_to=none", "progress=false", f"output_dir={out}", num_processes=2, check=False,
                          timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("notrainer: error:")]
    assert errors == [f"notrainer: error: streaming: {broken} cannot be decompressed "
                      "(Compressed file ended before the end-of-stream marker was reached)"]
    saved = list_checkpoints(out)
    assert len(saved) >= 2 and all(verify(p) is None for p in saved)
    assert not (out / "model.safetensors").exists()
