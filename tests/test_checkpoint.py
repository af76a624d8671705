"""Checkpoints: damaged ones are skipped, retention keeps the best, the best model is exported,
early stopping, the non-finite guard, timed checkpoints, and every bad resume input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import read_results, run_cli
from notrainer.engine import checkpoint as ckpt
from notrainer.errors import UsageError

TINY = ["task=clm", "per_device_train_batch_size=4", "logging_steps=2"]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def run8(tmp_path_factory) -> Path:
    """A finished 8-step run with checkpoints at steps 4 and 8 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("run8")
    run_cli(*TINY, "max_train_steps=8", "checkpointing_steps=4", output_dir=out)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------- damaged checkpoints


@pytest.mark.slow
def test_damaged_newest_checkpoint_falls_back_to_the_previous(run8, tmp_path, capsys):
    out = _copy(run8, tmp_path / "run")
    model = out / "checkpoints" / "step_8" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a write cut short
    results = run_cli(*TINY, "max_train_steps=10", "checkpointing_steps=4", "resume_from_checkpoint=auto",
                      output_dir=out)
    printed = capsys.readouterr().out
    assert f"checkpoint {out / 'checkpoints' / 'step_8'} is damaged: model.safetensors has" in printed
    assert f"resumed from {out / 'checkpoints' / 'step_4'} (step 4" in printed
    assert results["global_step"] == 10
    assert ckpt.verify(str(out / "checkpoints" / "step_8")) is None  # rewritten whole by the resumed run


def test_checkpoint_that_fails_to_load_falls_back_to_the_previous(run8, tmp_path, capsys):
    out = _copy(run8, tmp_path / "run")
    optimizer = out / "checkpoints" / "step_8" / "optimizer.bin"
    optimizer.write_bytes(b"\x07" * optimizer.stat().st_size)  # same size: only loading it tells
    results = run_cli(*TINY, "max_train_steps=9", "do_eval=false", "resume_from_checkpoint=auto", output_dir=out)
    printed = capsys.readouterr().out
    assert f"checkpoint {out / 'checkpoints' / 'step_8'} could not be loaded (" in printed
    assert f"falling back to {out / 'checkpoints' / 'step_4'}" in printed
    assert f"resumed from {out / 'checkpoints' / 'step_4'} (step 4" in printed
    assert results["global_step"] == 9


@pytest.mark.parametrize("damage, reason", [
    ("delete optimizer.bin", "optimizer.bin is missing"),
    ("scramble random_states_0.pkl", "cannot be read"),  # same size: only parsing it tells
    ("scramble model.safetensors", "cannot be read"),
    ("scramble COMPLETE", "COMPLETE mark is unreadable"),
])
def test_verify_names_what_is_damaged(run8, tmp_path, damage, reason):
    step = _copy(run8 / "checkpoints" / "step_8", tmp_path / "step_8")
    action, name = damage.split()
    if action == "delete":
        (step / name).unlink()
    else:
        size = (step / name).stat().st_size
        (step / name).write_bytes(b"\x07" * size)
    assert reason in ckpt.verify(str(step))
    with pytest.raises(UsageError, match=f"resume_from_checkpoint={step}: the checkpoint is damaged"):
        ckpt.resolve(str(tmp_path), str(step))


def test_all_checkpoints_damaged_is_one_clear_error(run8, tmp_path):
    out = _copy(run8, tmp_path / "run")
    for step in ("step_4", "step_8"):
        (out / "checkpoints" / step / "scheduler.bin").unlink()
    with pytest.raises(UsageError, match="no loadable checkpoint .*step_8 .*step_4 .*overwrite_output_dir=true"):
        run_cli(*TINY, "max_train_steps=10", "resume_from_checkpoint=auto", output_dir=out)


def test_half_written_checkpoint_is_never_resumed(run8, tmp_path):
    out = _copy(run8, tmp_path / "run")
    tmp = out / "checkpoints" / ".tmp-step_12"
    shutil.copytree(out / "checkpoints" / "step_8", tmp)  # a save killed before its rename
    (out / "checkpoints" / "step_8" / "COMPLETE").unlink()  # and one killed before its mark
    assert ckpt.resolve(str(out), "auto") == str(out / "checkpoints" / "step_4")


# ---------------------------------------------------------------------- best model, retention, early stopping


def test_retention_keeps_the_best_even_when_oldest_and_exports_it(tmp_path):
    out = tmp_path / "run"
    # The eval loss falls, so with greater_is_better=true the first evaluation stays the best.
    results = run_cli(*TINY, "max_train_steps=8", "eval_steps=2", "checkpointing_steps=2", "save_total_limit=2",
                      "metric_for_best_model=eval_loss", "greater_is_better=true", "load_best_model_at_end=true",
                      output_dir=out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_6", "step_8"]
    assert results["best_step"] == 2 and results["global_step"] == 8
    best = _tensors(out / "checkpoints" / "step_2" / "model.safetensors")
    final = _tensors(out / "model.safetensors")
    for name, tensor in best.items():
        assert torch.equal(final[name], tensor), name
    # The reported metrics are those of the exported (best) model.
    assert read_results(out)["eval_loss"] == pytest.approx(results["best_metric"], rel=1e-9)


def test_a_new_best_is_checkpointed_off_the_schedule(tmp_path):
    out = tmp_path / "run"
    results = run_cli(*TINY, "max_train_steps=6", "eval_steps=3", "checkpointing_steps=100",
                      "metric_for_best_model=loss", output_dir=out)  # "loss" means eval_loss, lower is better
    assert results["best_step"] == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_3", "step_6"]


def test_early_stopping_stops_after_patience_evaluations(tmp_path):
    out = tmp_path / "run"
    results = run_cli(*TINY, "max_train_steps=40", "eval_steps=2", "early_stopping_patience=2",
                      "metric_for_best_model=eval_loss", "greater_is_better=true", output_dir=out)
    # Evaluations at 2 (best), 4 and 6 (no improvement twice): stop at 6, model still exported.
    assert results["global_step"] == 6 and results["stopped_early_at_step"] == 6
    assert results["best_step"] == 2
    assert (out / "model.safetensors").is_file()


def test_timed_checkpoints(tmp_path):
    out = tmp_path / "run"
    run_cli(*TINY, "max_train_steps=3", "checkpointing_minutes=1e-6", "do_eval=false", output_dir=out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_2", "step_3"]


# ---------------------------------------------------------------------- non-finite guard


class _Regression(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _fit(out: Path, steps: int, nan_from: int | None = None, nan_until: int | None = None, **kwargs):
    """A plain-PyTorch run whose loss is NaN at optimizer steps nan_from..nan_until (1-based)."""
    from accelerate.utils import set_seed

    from notrainer import Loop

    set_seed(0)
    model = torch.nn.Linear(4, 1)
    loader = torch.utils.data.DataLoader(_Regression(), batch_size=4, shuffle=True)
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss = torch.nn.functional.mse_loss(m(batch[0]).squeeze(-1), batch[1])
        if nan_from is not None and nan_from <= calls["n"] <= (nan_until or 10**9):
            loss = loss * float("nan")
        return loss

    loop = Loop(model, torch.optim.SGD(model.parameters(), lr=0.05), loader, loss_fn=loss_fn,
                max_train_steps=steps, output_dir=str(out), seed=0, progress=False, export=False, **kwargs)
    return loop, loop.fit()


def test_nonfinite_step_is_skipped(tmp_path, capsys):
    skipped, results = _fit(tmp_path / "a", steps=3, nan_from=3, nan_until=3)
    assert "step 3: non-finite loss or gradient norm, optimizer step skipped (1 in a row" in capsys.readouterr().out
    assert skipped.state.skipped_steps == 1 and skipped.state.nonfinite_in_a_row == 1
    two_steps, _ = _fit(tmp_path / "b", steps=2)
    # The skipped step changed nothing: the weights are those after two steps.
    for a, b in zip(skipped.model.parameters(), two_steps.model.parameters()):
        assert torch.equal(a, b)
    assert results["train_loss"] == results["train_loss"]  # not NaN: the skipped loss is not averaged in


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
    from notrainer.engine.guards import TrainingDiverged

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"stopped at step 5: 3 optimizer steps in a row .*max_nonfinite_steps=3"):
        _fit(out, steps=20, nan_from=3, max_nonfinite_steps=3, checkpointing_steps=2)
    # No checkpoint is written during a run of non-finite steps: step_2, the last good one, stays the newest.
    assert [Path(p).name for p in ckpt.list_checkpoints(str(out))] == ["step_2"]
    assert all(torch.isfinite(v).all() for v in _tensors(out / "checkpoints" / "step_2" / "model.safetensors").values())


NAN_TASK = '''
from notrainer.tasks.clm import CLMTask

class NaNCLM(CLMTask):
    def loss(self, model, batch):
        return super().loss(model, batch) * float("nan")
'''


def test_cli_exit_status_on_nonfinite_losses(tmp_path, capsys):
    from notrainer.cli.run import main

    task = tmp_path / "nan_task.py"
    task.write_text(NAN_TASK)
    code = main([f"task={task}:NaNCLM", "per_device_train_batch_size=4", "max_train_steps=5", "max_nonfinite_steps=2",
                 "report_to=none", f"output_dir={tmp_path / 'run'}"])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("notrainer: error:")]
    assert code == 3
    assert len(errors) == 1 and errors[0].startswith("notrainer: error: training stopped at step 2: 2 optimizer steps in a row")
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ---------------------------------------------------------------------- bad resume input


def test_resume_missing_folder_exits_2_with_one_line(tmp_path, capsys):
    from notrainer.cli.run import main

    missing = tmp_path / "nope"
    code = main([*TINY, f"resume_from_checkpoint={missing}", f"output_dir={tmp_path / 'run'}", "report_to=none"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"notrainer: error: resume_from_checkpoint={missing}: no such folder"]
    assert not (tmp_path / "run").exists()


def test_resume_from_another_task_changes_nothing(run8, tmp_path):
    out = _copy(run8, tmp_path / "run")
    other = tmp_path / "other_task.py"
    other.write_text("from notrainer.tasks.clm import CLMTask\n\nclass OtherCLM(CLMTask):\n    pass\n")
    before = _snapshot(out)
    with pytest.raises(UsageError, match=r"step_8 is a checkpoint of task=clm, not task=.*OtherCLM"):
        run_cli(f"task={other}:OtherCLM", "resume_from_checkpoint=auto", output_dir=out)
    assert _snapshot(out) == before


def test_resume_with_another_model_shape_changes_nothing(run8, tmp_path):
    out = _copy(run8, tmp_path / "run")
    # The same model family and tokenizer, narrower: n_embd 128 -> 64.
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    for f in run8.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, narrow / f.name)
    config = json.loads((run8 / "config.json").read_text())
    config["n_embd"] = 64
    (narrow / "config.json").write_text(json.dumps(config))
    before = _snapshot(out)
    with pytest.raises(UsageError, match=r"holds another model shape \(transformer\.\S+: checkpoint \[.*\], "
                                         r"this model \[.*\]\)"):
        run_cli(*TINY, f"config_name={narrow}", "resume_from_checkpoint=auto", output_dir=out)
    assert _snapshot(out) == before


def test_resume_auto_without_checkpoint_starts_fresh_and_says_so(tmp_path, capsys):
    results = run_cli(*TINY, "max_train_steps=2", "do_eval=false", "resume_from_checkpoint=auto",
                      output_dir=tmp_path / "run")
    assert "resume_from_checkpoint=auto: no checkpoint in" in capsys.readouterr().out
    assert results["global_step"] == 2


@pytest.mark.parametrize("arg, message", [
    ("checkpointing_minutes=0", "checkpointing_minutes must be > 0"),
    ("max_nonfinite_steps=-1", "max_nonfinite_steps must be >= 0"),
    ("early_stopping_patience=0", "early_stopping_patience must be >= 1"),
    ("early_stopping_threshold=-1", "early_stopping_threshold must be >= 0"),
])
def test_bad_checkpoint_keys(arg, message):
    from notrainer.cli.run import parse_args

    with pytest.raises(UsageError, match=message):
        parse_args(["task=clm", arg])


def test_best_metric_needs_evaluation():
    from notrainer.cli.run import parse_args

    with pytest.raises(UsageError, match="need evaluation: set do_eval=true"):
        parse_args(["task=clm", "load_best_model_at_end=true", "do_eval=false"])


def test_unknown_best_metric_names_the_known_ones(tmp_path):
    with pytest.raises(UsageError, match=r"metric_for_best_model=eval_acuracy: .*it has: eval_loss, eval_perplexity"):
        run_cli(*TINY, "max_train_steps=2", "eval_steps=1", "metric_for_best_model=acuracy", output_dir=tmp_path / "r")


# ---------------------------------------------------------------------- exact-resume building blocks


def test_starting_a_loader_iterator_leaves_the_global_rng_alone():
    def rng_moved(loader) -> bool:
        before = torch.get_rng_state()
        next(iter(loader))
        return not torch.equal(torch.get_rng_state(), before)

    # torch draws the iterator's worker seed from the global RNG (the one dropout uses)...
    assert rng_moved(torch.utils.data.DataLoader(list(range(10)), batch_size=2))
    # ...unless the loader has a generator of its own, which seed_loader gives it.
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=2)
    ckpt.seed_loader(loader, seed=1, epoch=0)
    assert not rng_moved(loader)
