"""Elastic resume: a checkpoint written by 2 CPU processes continues on 1 and on 4 with the same
global batch (notrainer adjusts the accumulation and prints a note), from the same global position
in the data (the samples of every later step are exactly the uninterrupted run's, recorded by the
collator), and with the same loss curve within float tolerance. A sharded (DeepSpeed) checkpoint
on another process count is refused in one line (tests/test_deepspeed.py covers that format)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CPU_ENV, REPO, _free_port, read_results

pytestmark = pytest.mark.slow

# task=clm with sample ids: each collated train micro-batch appends its ids to ids_<rank>.txt
# (one line per micro-batch), and no dropout (so that the loss curve does not depend on which
# rank drew which mask).
ID_TASK = '''
import os
import torch
from notrainer.tasks.clm import CLMTask


class IdCLM(CLMTask):
    def prepare_datasets(self, raw, tokenizer):
        ds = super().prepare_datasets(raw, tokenizer)
        ds["train"] = ds["train"].add_column("sample_id", list(range(len(ds["train"]))))
        return ds

    def build_model(self, tokenizer):
        model = super().build_model(tokenizer)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model

    def collator(self, tokenizer):
        inner = super().collator(tokenizer)
        path = os.path.join(os.environ["IDS_DIR"], "ids_%s.txt" % os.environ.get("RANK", "0"))

        def collate(features):
            if features and "sample_id" in features[0]:
                ids = [f.pop("sample_id") for f in features]
                with open(path, "a") as f:
                    f.write(" ".join(map(str, ids)) + "\\n")
            return inner(features)

        return collate
'''

STEPS, AT = 6, 3  # resume from the checkpoint of step 3 of 6 (one epoch holds more than 6 steps)
GLOBAL_BATCH = 8


def _run(tmp_path: Path, processes: int, per_device: int, out: Path, ids: Path, *extra: str) -> str:
    ids.mkdir(parents=True, exist_ok=True)
    args = [f"task={tmp_path / 'id_task.py'}:IdCLM", "report_to=none", f"max_train_steps={STEPS}",
            f"checkpointing_steps={AT}", "do_eval=false", "logging_steps=1", "lr_scheduler_type=linear",
            f"per_device_train_batch_size={per_device}", f"output_dir={out}", *extra]
    if processes == 1:
        cmd = [sys.executable, "-m", "notrainer.run", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "notrainer.run", *args]
    proc = subprocess.run(cmd, env={**os.environ, **CPU_ENV, "IDS_DIR": str(ids)}, cwd=str(REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _steps(ids: Path, processes: int, accumulation: int, steps: int) -> list[set[int]]:
    """The sample ids of each optimizer step, from the per-rank files (extra lines at the end
    are batches the loader collated ahead and never trained on)."""
    per_rank = [[[int(x) for x in line.split()] for line in (ids / f"ids_{r}.txt").read_text().splitlines()]
                for r in range(processes)]
    out = []
    for s in range(steps):
        got: set[int] = set()
        for lines in per_rank:
            for line in lines[s * accumulation:(s + 1) * accumulation]:
                got.update(line)
        out.append(got)
    return out


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-process run (4 x 2 processes x 1 = 8 samples per step), shared."""
    tmp_path = tmp_path_factory.mktemp("elastic")
    (tmp_path / "id_task.py").write_text(ID_TASK)
    _run(tmp_path, 2, 4, tmp_path / "ref", tmp_path / "ids_ref")
    return tmp_path


@pytest.mark.parametrize("processes,per_device,accumulation", [(1, 4, 2), (4, 2, 1)],
                         ids=["2-to-1", "2-to-4"])
def test_two_process_checkpoint_resumes_on_another_process_count(processes, per_device, accumulation, reference,
                                                                 tmp_path):
    ref = reference / "ref"
    want_steps = _steps(reference / "ids_ref", 2, 1, STEPS)
    assert all(len(s) == GLOBAL_BATCH for s in want_steps) and len(set().union(*want_steps)) == STEPS * GLOBAL_BATCH

    # The run as it was at step 3, continued on another process count. The user keeps the
    # per-device batch (1 process) or halves it (4 processes); notrainer picks the accumulation.
    out = tmp_path / "resumed"
    shutil.copytree(ref / "checkpoints" / f"step_{AT}", out / "checkpoints" / f"step_{AT}")
    # (the task file of the reference run: a checkpoint resumes only with its own task)
    log = _run(reference, processes, per_device, out, tmp_path / "ids_new", "resume_from_checkpoint=auto")
    assert "resumed from" in log
    if accumulation != 1:
        assert f"gradient_accumulation_steps 1 -> {accumulation} keeps the global batch of {GLOBAL_BATCH}" in log
    got_steps = _steps(tmp_path / "ids_new", processes, accumulation, STEPS - AT)
    # the same samples in every later step: none repeated, none skipped
    assert got_steps == want_steps[AT:]

    want, got = _losses(ref), _losses(out)
    assert sorted(got) == list(range(AT + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-4), step
    assert read_results(out)["global_step"] == STEPS


# ---------------------------------------------------------------- the rules, without processes


def _checkpoint(tmp_path: Path, processes=2, per_device=4, accumulation=1, files=()) -> Path:
    path = tmp_path / "step_3"
    path.mkdir()
    layout = {"processes": processes, "per_device_batch_size": per_device, "gradient_accumulation_steps": accumulation}
    (path / "loop_state.json").write_text(json.dumps({"global_step": 3, "step_in_epoch": 3, "layout": layout}))
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("")
    return path


def _cfg(per_device=4, accumulation=1):
    from types import SimpleNamespace

    return SimpleNamespace(per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation)


def test_plan_keeps_the_global_batch_or_refuses_in_one_line(tmp_path):
    from notrainer.engine.elastic import plan
    from notrainer.errors import UsageError

    ckpt = _checkpoint(tmp_path)
    cfg = _cfg()
    assert plan(cfg, str(ckpt), 2) is None and cfg.gradient_accumulation_steps == 1  # same count: nothing
    assert "1 -> 2" in plan(cfg, str(ckpt), 1) and cfg.gradient_accumulation_steps == 2
    cfg = _cfg(per_device=2)
    assert plan(cfg, str(ckpt), 4) is None and cfg.gradient_accumulation_steps == 1  # the user kept 8
    with pytest.raises(UsageError, match="global batch is 8"):
        plan(_cfg(per_device=3), str(ckpt), 1)


def test_a_sharded_checkpoint_on_another_process_count_is_refused(tmp_path):
    from notrainer.engine.elastic import plan
    from notrainer.errors import UsageError

    ckpt = _checkpoint(tmp_path, files=["pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt"])
    with pytest.raises(UsageError, match="sharded format"):
        plan(_cfg(), str(ckpt), 1)
    assert plan(_cfg(), str(ckpt), 2) is None  # the same count resumes as usual


def test_position_is_converted_in_samples():
    from types import SimpleNamespace

    from notrainer.engine.elastic import convert_position, layout

    state = SimpleNamespace(step_in_epoch=3, layout=layout(2, 4, 1))  # 24 samples consumed
    convert_position(state, layout(1, 4, 2))
    assert state.step_in_epoch == 6 and state.layout == layout(1, 4, 2)
    state = SimpleNamespace(step_in_epoch=3, layout=layout(2, 4, 1))
    convert_position(state, layout(4, 2, 1))
    assert state.step_in_epoch == 3
