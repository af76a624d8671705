"""A value given for a text key stays text: YAML 1.1 would read no/off/yes/on as booleans and
1 as a number, which refused `mixed_precision=no` (the default, and what --help lists)."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from omegaconf import OmegaConf

from notrainer.config.parse import _dotlist, make_config, read_argv
from notrainer.errors import UsageError
from notrainer.cli.run import BUILTIN_TASKS

TEXT_TYPES = (str, "str", "Optional[str]", "str | None")
WORDS = ["no", "off", "yes", "on", "1", "0", "true", "1.5"]


def _config_classes():
    for name, spec in BUILTIN_TASKS.items():
        module, cls = spec.split(":")
        yield name, getattr(importlib.import_module(module), cls).Config


def _text_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _text_keys(type(default), prefix + f.name + ".")
        elif f.type in TEXT_TYPES:
            yield prefix + f.name


CASES = [(task, cls, key) for task, cls in _config_classes() for key in _text_keys(cls) if key != "task"]


def test_every_task_has_text_keys():
    # The parametrised test below must not pass by being empty.
    assert len(CASES) > 7 * 10


@pytest.mark.parametrize("task,cls,key", CASES, ids=[f"{t}-{k}" for t, _, k in CASES])
def test_text_key_keeps_the_word(task, cls, key):
    schema = OmegaConf.structured(cls)
    for word in WORDS:
        merged = OmegaConf.merge(schema, _dotlist([f"{key}={word}"], cls))
        assert OmegaConf.select(merged, key) == word, (task, key, word)


def test_null_still_unsets_an_optional_text_key():
    from notrainer.tasks.clm import CLMTask

    merged = OmegaConf.merge(OmegaConf.structured(CLMTask.Config), _dotlist(["dataset_name=null"], CLMTask.Config))
    assert merged.dataset_name is None


def test_non_text_keys_are_still_yaml():
    from notrainer.tasks.clm import CLMTask

    d = _dotlist(["do_eval=no", "learning_rate=1e-3", "lora.r=4", "source_prefix=summarize: "], CLMTask.Config)
    assert d.do_eval is False and d.learning_rate == 1e-3 and d.lora.r == 4


def test_cli_accepts_mixed_precision_no_and_save_strategy_no():
    from notrainer.tasks.clm import CLMTask

    pairs, file_cfg, _ = read_argv(["task=clm", "mixed_precision=no", "save_strategy=no", "report_to=none"])
    cfg = make_config(CLMTask.Config, pairs, file_cfg, "clm")
    assert cfg.mixed_precision == "no" and cfg.checkpointing_steps is None and cfg.report_to == "none"
    # A wrong word is still refused in one line, as the word given.
    pairs, file_cfg, _ = read_argv(["task=clm", "mixed_precision=yes"])
    with pytest.raises(UsageError, match="'yes'"):
        make_config(CLMTask.Config, pairs, file_cfg, "clm")
