"""Task modules: one per task, all run by the same `notrainer.Loop`.

`task=clm` names a built-in task; `task=my_pkg.my_module:MyTask` or
`task=path/to/file.py:MyTask` loads a user's subclass of `tasks.base.Task`.
"""

from __future__ import annotations

from notrainer.errors import UsageError, check

from .base import Task, import_object

#: built-in task name -> "module:Class"
BUILTIN_TASKS = {
    "clm": "tasks.clm:CLMTask",
    "sft": "tasks.sft:SFTTask",
    "mlm": "tasks.mlm:MLMTask",
    "classification": "tasks.classification:ClassificationTask",
    "token_classification": "tasks.token_classification:TokenClassificationTask",
    "seq2seq": "tasks.seq2seq:Seq2SeqTask",
    "qa": "tasks.qa:QATask",
}


def resolve_task(name: str) -> type[Task]:
    """A task name or 'module:Class' spec -> the Task subclass."""
    if name in BUILTIN_TASKS:
        spec = BUILTIN_TASKS[name]
    elif ":" in name:
        spec = name
    else:
        import difflib

        close = difflib.get_close_matches(name, list(BUILTIN_TASKS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"unknown task {name!r}{hint}; built-in tasks: {', '.join(BUILTIN_TASKS)}, "
                         "or 'pkg.module:Class' / 'path/file.py:Class' for your own")
    try:
        cls = import_object(spec, "task")
    except UsageError:
        if name in BUILTIN_TASKS:
            raise UsageError(f"task {name!r} is not available in this version") from None
        raise
    check(isinstance(cls, type) and issubclass(cls, Task), f"task={name!r}: {spec} is not a subclass of tasks.base.Task")
    return cls


__all__ = ["Task", "resolve_task", "BUILTIN_TASKS"]
