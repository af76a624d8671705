"""Run configuration: typed dataclasses, parsed with OmegaConf, validated before anything heavy.

`keys.py` (`TrainConfig`, `LoraConfig`: the keys and their checks), `parse.py` (argv and YAML to
a config, `--help`, the resolved config as YAML), `aliases.py` (the Trainer's and the scripts'
key names). The loop's own keys are `notrainer.engine.config.LoopConfig`, re-exported here.

May import: `notrainer.errors`, `notrainer.engine.config`; the checks in `validate()` also ask
the data and model modules what this install can serve. Never imports a task or the CLI; the
tasks import it (a task's `Config` subclasses `TrainConfig`).
"""

from notrainer.config.keys import LoraConfig, TrainConfig
from notrainer.config.parse import all_keys, help_text, make_config, read_argv, requested_task, save_yaml, to_dict
from notrainer.engine.config import LoopConfig, key

__all__ = ["TrainConfig", "LoraConfig", "LoopConfig", "key", "make_config", "read_argv", "requested_task",
           "help_text", "save_yaml", "to_dict", "all_keys"]
