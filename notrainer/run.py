"""`python -m notrainer.run key=value ...`: the CLI entry point (sub-commands: notrainer/cli/main.py; a run: notrainer/cli/run.py)."""

import sys

from notrainer.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
