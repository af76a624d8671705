"""The one place that touches library internals.

Every use of a private or undocumented API of accelerate, transformers, peft, deepspeed,
torchdata or torch lives here, as one small function. Each says the upstream version it was
written against, why no public API serves, and what would replace it; tests/test_compat.py
has a test per function that fails with a clear message when upstream changes what it relies
on. Nothing outside this module reads or writes a library object's `_private` attribute.
"""

from __future__ import annotations
