"""`notrainer verify-resume [options] [accelerate launch options] key=value ...`: prove that a
resume of *this* run (its model, data, engine and process count) is exact.

It runs the given configuration three times in a scratch folder, each as its own process (or
`accelerate launch` job, when launch options are given):

1. uninterrupted, for `--steps` optimizer steps (logging every step);
2. the same, killed with SIGKILL during step `--kill-at` (default: seeded from `--seed`),
   every rank at once, after a checkpoint (every `kill_at // 2` steps);
3. `resume_from_checkpoint=auto` on the killed run's folder, to the end.

Then it prints the loss of every step of both, the largest difference of the final weights and
one verdict line: `exact` (exit 0), `within tolerance` or where the runs first diverged (exit 1).
A run that fails is reported with its last lines (exit 1; exit 2 when the uninterrupted run
itself refuses the settings, a usage error).

    notrainer verify-resume task=clm model_name_or_path=gpt2 train_file=data/*.jsonl.gz streaming=true
    notrainer verify-resume --kill-at 5 --multi_gpu --num_processes 2 config=run.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile

#: keys verify-resume sets itself (the user's values for them are replaced)
OWN_KEYS = ("max_train_steps", "checkpointing_steps", "checkpointing_minutes", "logging_steps", "output_dir",
            "resume_from_checkpoint", "overwrite_output_dir", "report_to", "progress", "save_total_limit",
            "push_to_hub", "do_predict", "load_best_model_at_end", "early_stopping_patience")
KILL_ENV = "NOTRAINER_VERIFY_KILL_AT_STEP"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="notrainer verify-resume", add_help=False,
                                description="Check that a kill -9 and resume_from_checkpoint=auto continue bitwise.")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps of each run (default 8)")
    p.add_argument("--kill-at", type=int, default=None, help="the step during which the run is killed "
                                                              "(default: seeded, between the first checkpoint and the end)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill step (default 0)")
    p.add_argument("--tolerance", type=float, default=0.0, help="largest loss/weight difference called "
                                                                "'within tolerance' (default 0)")
    p.add_argument("--keep", default=None, help="folder for the three runs (kept); default: a temporary one, removed")
    p.add_argument("--timeout", type=float, default=1800, help="seconds each run may take (default 1800)")
    p.add_argument("-h", "--help", action="store_true")
    return p


def plan(steps: int, kill_at: int | None, seed: int) -> tuple[int, int]:
    """(kill step, checkpoint interval): the kill lands after at least one checkpoint."""
    from notrainer.errors import check

    check(steps >= 3, f"verify-resume: --steps must be >= 3, got {steps}")
    if kill_at is None:
        kill_at = random.Random(f"verify-resume/{seed}").randint(3, steps)
    check(2 <= kill_at <= steps, f"verify-resume: --kill-at must be in [2, {steps}], got {kill_at}")
    return kill_at, max(1, kill_at // 2)


def _command(launch_args: list[str], args: list[str]) -> list[str]:
    target = ["-m", "notrainer.cli.verify_resume", "--child", *args]
    if not launch_args:
        return [sys.executable, *target]
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_args, *target]


def _run(launch_args, args, env_extra: dict, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    try:
        return subprocess.run(_command(launch_args, args), env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, 124, e.stdout or "", f"timed out after {timeout:.0f} s")


def step_losses(output_dir: str) -> dict[int, float]:
    from notrainer.observability import history

    return {int(r["step"]): r["loss"] for r in history.read(output_dir) if r.get("kind") == "train" and "loss" in r}


def weight_difference(a: str, b: str) -> tuple[float, int]:
    """(largest absolute difference over every tensor of the exported weights, tensors compared)."""
    from safetensors.torch import load_file

    def tensors(folder: str) -> dict:
        out = {}
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                out.update({f"{name}:{k}": v for k, v in load_file(os.path.join(folder, name)).items()})
        return out

    ta, tb = tensors(a), tensors(b)
    if not ta or set(ta) != set(tb):
        return float("inf"), 0
    worst = 0.0
    for k, x in ta.items():
        y = tb[k]
        if x.shape != y.shape:
            return float("inf"), len(ta)
        if not x.equal(y):
            worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst, len(ta)


def verdict(ref: dict[int, float], got: dict[int, float], weight_diff: float, tolerance: float) -> tuple[bool, str]:
    """(exact, the one-line verdict)."""
    steps = sorted(set(ref) | set(got))
    missing = [s for s in steps if s not in ref or s not in got]
    if missing:
        return False, f"not exact: step {missing[0]} was logged by one run only"
    differing = [s for s in steps if ref[s] != got[s]]
    if not differing and weight_diff == 0:
        return True, f"exact: the resumed run matches the uninterrupted one bitwise ({len(steps)} step losses, final weights)"
    worst = max((abs(ref[s] - got[s]) for s in steps), default=0.0)
    if worst <= tolerance and weight_diff <= tolerance:
        return False, (f"within tolerance {tolerance:g} but not exact: largest loss difference {worst:.3g}, "
                       f"largest weight difference {weight_diff:.3g}")
    if differing:
        s = differing[0]
        return False, (f"diverged at step {s}: loss {ref[s]:.8g} uninterrupted vs {got[s]:.8g} resumed; largest "
                       f"weight difference {weight_diff:.3g}")
    return False, f"diverged in the final weights (largest difference {weight_diff:.3g}); the step losses are equal"


def _fmt(v) -> str:
    return f"{v:.8g}" if v is not None else "-"


def _tail(proc: subprocess.CompletedProcess, n: int = 15) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-n:])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    from notrainer.cli.launch import split_argv
    from notrainer.errors import UsageError

    opts, rest = _parser().parse_known_args(argv)
    if opts.help:
        print(__doc__.strip())
        return 0
    launch_args, run_args = split_argv(rest)
    try:
        kill_at, every = plan(opts.steps, opts.kill_at, opts.seed)
    except UsageError as e:
        print(f"notrainer: error: {e}", file=sys.stderr)
        return 2
    run_args = [a for a in run_args if a.split("=", 1)[0].lstrip("-") not in OWN_KEYS]
    root = opts.keep or tempfile.mkdtemp(prefix="notrainer-verify-resume-")
    os.makedirs(root, exist_ok=True)
    ref_dir, run_dir = os.path.join(root, "uninterrupted"), os.path.join(root, "resumed")
    common = [*run_args, f"max_train_steps={opts.steps}", f"checkpointing_steps={every}", "logging_steps=1",
              "report_to=none", "progress=false", "overwrite_output_dir=true"]
    try:
        print(f"verify-resume: {opts.steps} steps, a checkpoint every {every}, SIGKILL during step {kill_at}, "
              f"then resume_from_checkpoint=auto ({' '.join(launch_args) or '1 process'}); runs in {root}", flush=True)
        ref = _run(launch_args, [*common, f"output_dir={ref_dir}"], {}, opts.timeout)
        if ref.returncode != 0:
            print(f"notrainer: error: verify-resume: the uninterrupted run failed (exit {ref.returncode}):\n"
                  f"{_tail(ref)}", file=sys.stderr)
            return 2 if ref.returncode == 2 else 1
        killed = _run(launch_args, [*common, f"output_dir={run_dir}"], {KILL_ENV: str(kill_at)}, opts.timeout)
        from notrainer.engine.checkpoint import list_checkpoints

        saved = list_checkpoints(run_dir)
        if killed.returncode == 0 or not saved:
            print(f"notrainer: error: verify-resume: the run to kill {'finished' if killed.returncode == 0 else 'failed'} "
                  f"without a checkpoint to resume (exit {killed.returncode}):\n{_tail(killed)}", file=sys.stderr)
            return 1
        resumed = _run(launch_args, [*common[:-1], f"output_dir={run_dir}", "resume_from_checkpoint=auto"], {},
                       opts.timeout)
        if resumed.returncode != 0:
            print(f"notrainer: error: verify-resume: the resumed run failed (exit {resumed.returncode}):\n"
                  f"{_tail(resumed)}", file=sys.stderr)
            return 1
        a, b = step_losses(ref_dir), step_losses(run_dir)
        print(f"killed during step {kill_at}; resumed from {os.path.basename(saved[-1])}")
        print(f"{'step':>5}  {'uninterrupted':>14}  {'resumed':>14}  {'difference':>11}")
        for s in sorted(set(a) | set(b)):
            x, y = a.get(s), b.get(s)
            diff = f"{abs(x - y):.3g}" if x is not None and y is not None else "missing"
            print(f"{s:>5}  {_fmt(x):>14}  {_fmt(y):>14}  {diff:>11}")
        wdiff, n = weight_difference(ref_dir, run_dir)
        print(f"largest weight difference: {wdiff:.3g} ({n} tensors of the exported model)")
        exact, line = verdict(a, b, wdiff, opts.tolerance)
        print(line)
        return 0 if exact else 1
    finally:
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)


def child(argv: list[str]) -> int:
    """One run of the CLI; with NOTRAINER_VERIFY_KILL_AT_STEP set, each rank SIGKILLs itself
    when it starts that optimizer step (a hard kill: nothing is flushed or cleaned up)."""
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    if kill_at:
        from notrainer.engine.loop import Loop

        step = Loop.train_step

        def train_step(self, window):
            if self.state.global_step + 1 >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, window)

        Loop.train_step = train_step
    from notrainer.cli.run import main as run_main

    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
