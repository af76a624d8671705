"""A full disk while a checkpoint is written: the save fails in one line naming the folder and
the free space, the half-written folder is never taken for a checkpoint, retention
(save_total_limit=1) has not deleted the last complete checkpoint, and resuming from it ends
bitwise equal to an uninterrupted run.

The disk fills up partway through the save: accelerate's writer is patched to write half of
the optimizer file and then fail with ENOSPC, as a write(2) on a full file system does."""

from __future__ import annotations

import errno
import os

import pytest
from safetensors.torch import load_file

from conftest import one_thread, read_results, run_cli
from notrainer.cli.run import main
from notrainer.engine import checkpoint

ARGS = ["task=clm", "max_train_steps=6", "checkpointing_steps=2", "save_total_limit=1",
        "gradient_accumulation_steps=2", "per_device_train_batch_size=4", "logging_steps=2", "eval_steps=3"]


@pytest.fixture
def disk_fills_at(monkeypatch):
    """disk_fills_at(folder_name): saving into that checkpoint folder hits a full disk halfway
    through the optimizer file."""
    import accelerate.checkpointing as writer

    real_save = writer.save

    def arm(folder_name: str):
        def save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            if os.path.basename(os.path.dirname(str(f))) == folder_name and str(f).endswith("optimizer.bin"):
                with open(f, "r+b") as fh:  # the part that did reach the disk
                    fh.truncate(os.path.getsize(f) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

        monkeypatch.setattr(writer, "save", save)
        return lambda: monkeypatch.setattr(writer, "save", real_save)

    return arm


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint(tmp_path, capsys, disk_fills_at):
    with one_thread():
        run_cli(*ARGS, output_dir=tmp_path / "reference")
    reference = load_file(tmp_path / "reference" / "model.safetensors")

    out = tmp_path / "run"
    disarm = disk_fills_at(".tmp-step_4")
    with one_thread():
        status = main([*ARGS, f"output_dir={out}", "report_to=none"])
    disarm()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notrainer:")]
    assert status == 2
    assert len(lines) == 1, lines
    line = lines[0]
    root = out / "checkpoints"
    assert f"checkpoint {root / 'step_4'} could not be written in {root}: no space left on device (" in line
    assert "MiB free there" in line and f"the last complete checkpoint {root / 'step_2'} is intact" in line

    # The half-written folder is gone and never named like a checkpoint; step_2 survived
    # retention (save_total_limit=1) and is whole.
    assert sorted(os.listdir(root)) == ["step_2"]
    assert checkpoint.list_checkpoints(str(out)) == [str(root / "step_2")]
    assert checkpoint.verify(str(root / "step_2")) is None
    assert not (out / "model.safetensors").exists()

    with one_thread():
        run_cli(*ARGS, "resume_from_checkpoint=auto", output_dir=out)
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert (resumed[name] == reference[name]).all(), name
    assert read_results(out)["global_step"] == 6
    assert checkpoint.list_checkpoints(str(out)) == [str(root / "step_6")]

