"""Task modules: one per task, all run by the same `notrainer.Loop`.

`task=clm` names a built-in task (the registry lives with the CLI, in `notrainer.cli.run`);
`task=my_pkg.my_module:MyTask` or `task=path/to/file.py:MyTask` loads a user's subclass of
`notrainer.tasks.base.Task`.
"""

from .base import Task

__all__ = ["Task"]
