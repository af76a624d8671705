"""`notrainer launch [accelerate launch options] key=value ...`: accelerate's launcher, in-process.

`accelerate launch -m notrainer.run learning_rate=-1` prints our one line (`notrainer: error:
...`) and then accelerate's own `CalledProcessError` traceback (one process) or torchrun's
`ChildFailedError` report (several), because the launcher turns any non-zero exit of its
children into an exception. Here the same launcher runs inside this process; when a child
fails, its exit status becomes ours and nothing more is printed: the child already said what
went wrong. Exit statuses stay those of `notrainer.cli.run` (2 usage error, 75 preempted, ...).

    notrainer launch --multi_gpu --num_processes 8 task=clm model_name_or_path=gpt2 ...
    notrainer launch --config_file launch/deepspeed_zero3.yaml -- task=sft --learning_rate 2e-5

Everything before the first `key=value` argument (or before `--`) goes to accelerate; the
rest is the run's arguments, in any form `notrainer.cli.run` takes.
"""

from __future__ import annotations

import subprocess
import sys


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(accelerate's options, the run's arguments)."""
    from notrainer.config.parse import _is_pair

    for i, arg in enumerate(argv):
        if arg == "--":
            return argv[:i], argv[i + 1:]
        if not arg.startswith("-") and _is_pair(arg):
            return argv[:i], argv[i:]
    return argv, []


def _child_status(error: BaseException) -> int:
    """The first failed rank's exit status from torchrun's ChildFailedError (1 if unknown)."""
    failures = getattr(error, "failures", None) or {}
    for _, failure in sorted(failures.items()):
        code = getattr(failure, "exitcode", None)
        if isinstance(code, int) and code > 0:
            return code
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.split("\n\n", 1)[0])
        print("usage: notrainer launch [accelerate launch options] [--] key=value ...  "
              "(accelerate's options: accelerate launch --help)")
        return 0
    launcher_args, run_args = split_argv(argv)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from notrainer import compat

    try:
        compat.accelerate_launch(launcher_args, "notrainer.cli.run", run_args)
    except subprocess.CalledProcessError as e:  # one process: the child printed its message
        return e.returncode if e.returncode > 0 else 1
    except ChildFailedError as e:  # several processes: torchrun's report of the failed ranks
        return _child_status(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
