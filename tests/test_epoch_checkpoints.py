"""checkpointing_steps=epoch saves at the end of every epoch, the last one included, and a run
resumed from an epoch's checkpoint ends with the same weights as the uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import read_results, run_cli
from notrainer.engine.checkpoint import list_checkpoints, step_of

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

ARGS = ["task=clm", "checkpointing_steps=epoch", "do_eval=false", "logging_steps=5", "progress=false"]


def _states(out: Path) -> list[dict]:
    return [json.loads((Path(p) / "loop_state.json").read_text()) for p in list_checkpoints(str(out))]


def test_a_one_epoch_run_saves_its_epoch(tmp_path):
    out = tmp_path / "run"
    results = run_cli(*ARGS, "num_train_epochs=1", output_dir=out)
    found = list_checkpoints(str(out))
    assert [step_of(p) for p in found] == [results["global_step"]]
    assert [(s["epoch"], s["step_in_epoch"]) for s in _states(out)] == [(1, 0)]


@pytest.mark.slow
def test_every_epoch_is_saved_and_resuming_one_gives_the_same_weights(tmp_path):
    ref = tmp_path / "ref"
    results = run_cli(*ARGS, "num_train_epochs=3", output_dir=ref)
    steps = [step_of(p) for p in list_checkpoints(str(ref))]
    assert len(steps) == 3 and steps[-1] == results["global_step"]
    assert steps == [steps[0], 2 * steps[0], 3 * steps[0]]  # one per epoch, at its end
    assert [(s["epoch"], s["step_in_epoch"]) for s in _states(ref)] == [(1, 0), (2, 0), (3, 0)]

    # Resume from the first epoch's checkpoint: epochs 2 and 3 again, to the same weights.
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / f"step_{steps[0]}", out / "checkpoints" / f"step_{steps[0]}")
    resumed = run_cli(*ARGS, "num_train_epochs=3", "resume_from_checkpoint=auto", output_dir=out)
    assert resumed["global_step"] == results["global_step"]
    assert [step_of(p) for p in list_checkpoints(str(out))] == steps
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert read_results(out)["train_loss"] == pytest.approx(results["train_loss"], rel=1e-6)
