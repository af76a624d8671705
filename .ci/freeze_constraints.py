"""Write .ci/constraints.txt: the exact versions of everything `pip install -e ".[test]"` (and the
optional extras installed here) pulls in, from the current environment.

    python .ci/freeze_constraints.py > .ci/constraints.txt

Run it in the environment the whole suite has just passed in. notrainer itself is left out.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(root: str, extras: list[str]) -> dict[str, str]:
    seen: dict[str, str] = {}
    todo = [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:  # an optional extra not installed here (wandb, mlflow, mkdocs)
            continue
        key = canonicalize_name(dist.metadata["Name"])
        if key in seen and not wanted:
            continue
        seen[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None:
                env = default_environment()
                if not any(req.marker.evaluate({**env, "extra": e}) for e in (wanted or {""})):
                    continue
            if canonicalize_name(req.name) not in seen or req.extras:
                todo.append((req.name, set(req.extras)))
    return seen


def main() -> None:
    dist = md.distribution("notrainer")
    extras = [e for e in dist.metadata.get_all("Provides-Extra") or []]
    pins = closure("notrainer", extras)
    pins.pop("notrainer", None)
    print("# The exact versions CI tested (.ci/run installs with -c .ci/constraints.txt).")
    print(f"# Python {sys.version.split()[0]}; regenerate: python .ci/freeze_constraints.py > .ci/constraints.txt")
    print("# torch stays at the CPU wheel CI installs first (see docs/versions.md).")
    for key in sorted(pins):
        version = re.sub(r"\+.*$", "", pins[key])  # torch==2.13.0+cpu: the local label is the wheel's, not a version
        print(f"{key}=={version}")


if __name__ == "__main__":
    main()
