"""Import a user's object named as 'pkg.module:Name' or 'path/to/file.py:Name' (task=, model_class=)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from .errors import UsageError, check


def import_object(spec: str, what: str):
    """'pkg.module:Name' or 'path/to/file.py:Name' -> the object."""
    check(":" in spec, f"{what}={spec!r}: expected 'pkg.module:Name' or 'path/file.py:Name'")
    module_part, attr = spec.rsplit(":", 1)
    if module_part.endswith(".py"):
        check(os.path.isfile(module_part), f"{what}={spec!r}: no such file {module_part}")
        mod_name = os.path.splitext(os.path.basename(module_part))[0]
        loader_spec = importlib.util.spec_from_file_location(mod_name, module_part)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as e:
            raise UsageError(f"{what}={spec!r}: cannot import {e.name!r}") from None
    check(hasattr(module, attr), f"{what}={spec!r}: {module_part} has no {attr!r}")
    return getattr(module, attr)
