"""`notrainer verify-resume`: "exact" and exit 0 on a run whose resume is exact (the embedded
default, a streaming mixture); on a loop broken on purpose (its data order changes on resume)
it names the first step that differs and exits non-zero."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import CPU_ENV, REPO

# A task whose training order is reshuffled on resume: what a dataloader that forgets its
# position does. The first step after the checkpoint then trains on other blocks.
BROKEN_TASK = '''
from notrainer.tasks.clm import CLMTask

class ReshufflesOnResume(CLMTask):
    def prepare_datasets(self, raw, tokenizer):
        ds = super().prepare_datasets(raw, tokenizer)
        if self.cfg.resume_from_checkpoint:
            ds["train"] = ds["train"].shuffle(seed=1234)
        return ds
'''

SMALL = ["block_size=32", "per_device_train_batch_size=4", "do_eval=false"]


def _verify(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    import os

    cmd = [sys.executable, "-m", "notrainer.run", "verify-resume", *args]
    try:
        return subprocess.run(cmd, env={**os.environ, **CPU_ENV}, cwd=str(REPO), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"verify-resume did not finish in {timeout} s") from e


@pytest.mark.slow
def test_the_default_run_resumes_exactly():
    proc = _verify("--steps", "6", "--kill-at", "5", "task=clm", *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("exact: the resumed run matches the uninterrupted one bitwise (6 step losses")
    assert "killed during step 5; resumed from step_4" in proc.stdout
    assert "largest weight difference: 0 (" in proc.stdout
    table = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in table] == [1, 2, 3, 4, 5, 6] and all(row[3] == "0" for row in table)


@pytest.mark.slow
def test_a_streaming_mixture_resumes_exactly(tmp_path):
    from test_mixture import _rows_file, _spec

    from notrainer.tasks.clm import builtin_corpus

    docs = builtin_corpus(300, seed=2)
    web = [_rows_file(tmp_path / "web" / f"part-{s}.jsonl.gz", [{"text": d} for d in docs[s * 100:(s + 1) * 100]],
                      True) for s in range(2)]
    books = _rows_file(tmp_path / "books.jsonl", [{"text": d} for d in docs[200:]])
    spec = _spec((tmp_path / "web", 0.6), (books, 0.4))
    proc = _verify("--steps", "6", "--seed", "3", "task=clm", spec, "streaming=true", "shuffle_buffer_size=8",
                   "gradient_accumulation_steps=2", *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("exact:")
    assert len(web) == 2


@pytest.mark.slow
def test_a_loop_that_reshuffles_on_resume_is_caught_at_its_first_differing_step(tmp_path):
    task = tmp_path / "broken.py"
    task.write_text(BROKEN_TASK)
    proc = _verify("--steps", "6", "--kill-at", "5", f"task={task}:ReshufflesOnResume", *SMALL)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    # checkpoints every 2 steps, killed during step 5: resumed from step 4, so step 5 differs
    assert last.startswith("diverged at step 5: loss "), last
    assert "largest weight difference" in last


@pytest.mark.parametrize("args, message", [
    (["--steps", "2", "task=clm"], "verify-resume: --steps must be >= 3, got 2"),
    (["--steps", "6", "--kill-at", "9", "task=clm"], "verify-resume: --kill-at must be in [2, 6], got 9"),
])
def test_bad_options_are_one_line(args, message, capsys):
    from notrainer.cli.main import main

    assert main(["verify-resume", *args]) == 2
    assert capsys.readouterr().err.strip() == f"notrainer: error: {message}"
