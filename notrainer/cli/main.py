"""The `notrainer` command (and `python -m notrainer.run`): a sub-command, or a run.

    notrainer key=value ...                  train / evaluate / predict (notrainer/cli/run.py)
    notrainer launch [accelerate options] key=value ...   accelerate's launcher, in-process,
                                             so a usage error still ends in one line
    notrainer report RUN_DIR                 the run report (notrainer/observability/report.py)
    notrainer verify-resume [options] key=value ...       kill -9 and resume: exact or not
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        from notrainer.cli.launch import main as launch_main

        return launch_main(argv[1:])
    if argv[:1] == ["report"]:
        from notrainer.observability.report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["verify-resume"]:
        from notrainer.cli.verify_resume import main as verify_main

        return verify_main(argv[1:])
    from notrainer.cli.run import main as run_main

    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
