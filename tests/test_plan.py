"""Plan once, then freeze: `run.build` resolves everything derived (output_dir, the resume
checkpoint, the elastic layout, mixed precision, mode) once; afterwards the config cannot be
assigned to, and no step reads the checkpoint's small files again."""

from __future__ import annotations

import builtins
import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from conftest import run_cli
from notrainer.cli.run import build, parse_args

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = ["task=clm", "per_device_train_batch_size=4", "logging_steps=2", "report_to=none", "progress=false"]


def test_assigning_to_the_config_after_planning_raises(tmp_path):
    cfg, task_cls = parse_args([*TINY, "max_train_steps=2", "mode=eval", f"output_dir={tmp_path / 'run'}"])
    cfg.learning_rate = 1e-3  # before planning the config is still being settled
    loop, _ = build(cfg, task_cls)
    assert cfg.frozen and loop.config is cfg  # the loop runs on the very object that was planned
    # what planning settled is in it: output_dir, mixed precision, the mode's flags
    assert (cfg.output_dir, cfg.mixed_precision, cfg.do_train) == (str(tmp_path / "run"), "no", False)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to learning_rate: the config is frozen"):
        cfg.learning_rate = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to r"):
        cfg.lora.r = 8  # nested groups are frozen with it
    assert cfg.learning_rate == 1e-3 and cfg.lora.r == 0
    changed = dataclasses.replace(cfg, learning_rate=0.5)  # a changed copy is the way to vary a config
    assert changed.learning_rate == 0.5 and not changed.frozen


def test_a_resume_reads_the_checkpoint_files_once(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_cli(*TINY, "max_train_steps=4", "checkpointing_steps=2", "do_eval=false", output_dir=out)
    step4 = out / "checkpoints" / "step_4"

    reads: Counter = Counter()
    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        path = Path(str(file)) if isinstance(file, (str, Path)) else None
        if path is not None and "r" in mode and path.parent.parent.name == "checkpoints":
            reads[(path.parent.name, path.name)] += 1
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    results = run_cli(*TINY, "max_train_steps=6", "checkpointing_steps=2", "do_eval=false",
                      "resume_from_checkpoint=auto", output_dir=out)
    monkeypatch.setattr(builtins, "open", real_open)
    assert results["global_step"] == 6
    # resolved and verified once (the plan); the elastic plan, the task and model checks and the
    # load all use what was read then
    assert reads[("step_4", "loop_state.json")] == 1, reads
    assert reads[("step_4", "COMPLETE")] == 1, reads
    assert reads[("step_4", "config.yaml")] == 1, reads
    assert not any(step == "step_2" for step, _ in reads), reads  # an older one is never opened
    assert step4.is_dir()
