"""`python -m notrainer.run key=value ...`: the CLI entry point (the code is in notrainer/cli/run.py)."""

import sys

from notrainer.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
