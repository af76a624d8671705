"""From the command line to a validated config: `key=value` pairs and `config=run.yaml`,
parsed with OmegaConf into a task's config class; `--help`; the resolved config as YAML.

    pairs, file_cfg, _ = read_argv(["task=clm", "learning_rate=3e-4", "config=run.yaml"])
    cfg = make_config(CLMConfig, pairs, file_cfg, "clm")

The CLI (`notrainer.cli.run.parse_args`) picks the task's config class from the task registry;
this module never imports a task.

Precedence: dataclass defaults < the YAML file given as `config=` < `key=value` pairs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from notrainer.config.keys import TrainConfig
from notrainer.errors import UsageError, check, first_line


# ----------------------------------------------------------------------------- parsing


def all_keys(config_cls: type) -> list[str]:
    """Every dotted key a config class accepts, nested groups included."""
    out = []
    for f in dataclasses.fields(config_cls):
        tp = f.type if not isinstance(f.type, str) else None
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += [f"{f.name}.{k}" for k in all_keys(type(default))]
        else:
            out.append(f.name)
        del tp
    return out


def _split_argv(argv: list[str]) -> tuple[list[str], bool]:
    """The arguments as key=value pairs. Beside our `key=value`, the Trainer / argparse habits:
    `--key=value`, `--key value` and a bare `--flag` (true). After `--key`, the next argument is
    its value unless it starts with `--` or is itself a `key=value` pair (so a value holding `=`
    needs `--key=value`)."""
    want_help = False
    pairs = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help", "help"):
            want_help = True
            continue
        if arg.startswith("--"):
            name = arg[2:]
            if "=" in name:  # --key=value
                pairs.append(name)
                continue
            check(bool(name), "a lone '--' is not an argument (for example: --learning_rate 3e-4)")
            nxt = argv[i] if i < len(argv) else None
            if nxt is not None and not nxt.startswith("--") and nxt not in ("-h", "help") and not _is_pair(nxt):
                pairs.append(f"{name}={nxt}")  # --key value
                i += 1
            else:
                pairs.append(f"{name}=true")  # --flag
            continue
        check("=" in arg, f"expected key=value, got {arg!r} (for example: learning_rate=3e-4 or --learning_rate 3e-4)")
        pairs.append(arg)
    return pairs, want_help


def _is_pair(arg: str) -> bool:
    """`name=...` with a key-like name (letters, digits, _ and dots), not a value such as 'a=b c'."""
    name = arg.split("=", 1)[0]
    return "=" in arg and bool(name) and name.replace("_", "a").replace(".", "a").isalnum()


def read_argv(argv: list[str] | None = None):
    """The command line as (key=value pairs, the `config=` YAML file as a config, whether --help
    was asked). Nothing is checked against a schema yet: that needs the task's config class."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pairs, want_help = _split_argv(argv)
    given = dict(p.split("=", 1) for p in pairs)
    file_cfg = OmegaConf.create()
    if given.get("config"):
        path = given["config"]
        check(os.path.isfile(path), f"config={path}: no such file")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry multi-line context; keep the first line
            raise UsageError(f"config={path}: not valid YAML ({first_line(e)})") from None
        check(isinstance(file_cfg, type(OmegaConf.create())), f"config={path}: expected a mapping of key: value")
    return pairs, file_cfg, want_help


def requested_task(pairs: list[str], file_cfg) -> str:
    """The `task=` value: from the command line, else the YAML file, else the default."""
    given = dict(p.split("=", 1) for p in pairs)
    return given.get("task") or file_cfg.get("task") or TrainConfig.task


def make_config(config_cls: type, pairs: list[str], file_cfg, task_name: str,
                embedded_defaults: dict | None = None, data_length_keys=()):
    """Merge defaults < YAML file < key=value pairs into `config_cls`, then validate.

    The embedded default (no model given) trains a tiny model from scratch, which wants other
    settings than fine-tuning (a higher learning rate, more epochs): `embedded_defaults` supplies
    them, and anything the user set explicitly wins. With the user's own data (a data file or
    dataset_name), the keys in `data_length_keys` (lengths that cut the user's examples: QA's
    max_seq_length and doc_stride, seq2seq's source/target lengths) keep their own defaults,
    which are the HF scripts'. What the embedded defaults change is said in one line (stdout)."""
    schema = OmegaConf.structured(config_cls)
    pairs, file_cfg = _translate_aliases(pairs, file_cfg, config_cls)  # max_steps=, bf16=, ... (aliases.py)
    try:
        merged = OmegaConf.merge(schema, file_cfg, _dotlist(pairs, config_cls))
        merged.task = task_name
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise UsageError(_explain(e, config_cls)) from None
    changed = []
    if cfg.model_name_or_path is None and cfg.config_name is None:
        given_keys = {p.split("=", 1)[0] for p in pairs} | set(OmegaConf.to_container(file_cfg).keys())
        user_data = bool(cfg.train_file or cfg.validation_file or cfg.test_file or cfg.dataset_name)
        for name, value in (embedded_defaults or {}).items():
            if name in given_keys or (user_data and name in data_length_keys):
                continue
            if getattr(cfg, name, None) != value:
                changed.append(f"{name}={value}")
            setattr(cfg, name, value)
    cfg.validate()
    if changed and str(os.environ.get("RANK", "0")) == "0":
        print(f"notrainer: no model_name_or_path, so the tiny built-in model trains with {', '.join(changed)} "
              "(give any of these keys to set it; with a model the usual defaults apply)", flush=True)
    return cfg


def _translate_aliases(pairs: list[str], file_cfg, config_cls: type):
    """The Trainer's / HF scripts' names (docs/coming-from-trainer.md) as our keys, on the
    command line and in the YAML file alike."""
    from notrainer.config.aliases import translate

    keys = set(all_keys(config_cls))
    try:
        items = translate((p.split("=", 1) for p in pairs), keys)
        file_items = translate(OmegaConf.to_container(file_cfg).items(), keys)
    except ValueError as e:
        raise UsageError(str(e)) from None
    pairs = [f"{name}={_yaml_text(value)}" for name, value in items]
    new_file = OmegaConf.create()
    for name, value in file_items:
        OmegaConf.update(new_file, name, value, merge=True)
    return pairs, new_file


def _yaml_text(value: Any) -> str:
    """A translated value back as dotlist text (None -> null, False -> false)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _dotlist(pairs: list[str], config_cls: type):
    """key=value pairs as a config. Values are YAML, except that a text key keeps its text
    whenever YAML would make anything but a string or null of it: YAML 1.1 reads no/off/yes/on
    as booleans and 1 as a number (mixed_precision=no, save_strategy=no, source_prefix="summarize: ")."""
    text_types = (str, Optional[str], "str", "Optional[str]", "str | None", "Optional[str] | None")

    def is_text_key(dotted: str) -> bool:
        # Walk nested groups (lora.x) through their dataclass defaults.
        cls = config_cls
        *groups, leaf = dotted.split(".")
        for g in groups:
            f = next((f for f in dataclasses.fields(cls) if f.name == g), None) if dataclasses.is_dataclass(cls) else None
            if f is None or f.default_factory is dataclasses.MISSING:
                return False
            cls = type(f.default_factory())
        if not dataclasses.is_dataclass(cls):
            return False
        return any(f.name == leaf and f.type in text_types for f in dataclasses.fields(cls))

    out = OmegaConf.from_dotlist(pairs)
    for pair in pairs:
        name, value = pair.split("=", 1)
        # null stays null (it unsets an optional key); a quoted "no" already arrives as a string.
        if is_text_key(name) and not isinstance(OmegaConf.select(out, name), (str, type(None))):
            OmegaConf.update(out, name, value, force_add=True)
    return out


def _explain(e: OmegaConfBaseException, config_cls: type) -> str:
    """Turn an OmegaConf error into one line that says what to do."""
    full_key = getattr(e, "full_key", None) or ""
    kind = type(e).__name__
    if "Key" in kind and ("not in" in str(e) or "not found" in str(e).lower() or kind == "ConfigKeyError"):
        from notrainer.config.aliases import hint as alias_hint

        keys = all_keys(config_cls)
        # The alias table first: edit distance alone sends save_steps to eval_steps.
        hint = alias_hint(full_key, keys) or " (see --help for the keys)"
        return f"unknown key {full_key!r}{hint}"
    if kind in ("ValidationError", "ConfigTypeError", "GrammarParseError") and full_key:
        return f"{full_key}: {first_line(e)}"
    return first_line(e)


def to_dict(cfg: TrainConfig) -> dict:
    """The resolved config as plain data (for config.yaml and trackers)."""
    return OmegaConf.to_container(OmegaConf.structured(_without_secrets(cfg)), resolve=True)


def _without_secrets(cfg):
    # A token must not land in config.yaml, checkpoints, trackers or a pushed repo.
    if getattr(cfg, "hub_token", None):
        return dataclasses.replace(cfg, hub_token=None)
    return cfg


def save_yaml(cfg: TrainConfig, path: str) -> None:
    tmp = path + ".tmp"
    OmegaConf.save(OmegaConf.structured(_without_secrets(cfg)), tmp)
    os.replace(tmp, path)


def help_text(config_cls: type, task_cls: type | None = None) -> str:
    titles = {
        "run": "Run", "model": "Model and tokenizer", "data": "Data", "optim": "Optimisation",
        "speed": "Speed and memory", "loop": "Evaluation, checkpoints, logging", "lora": "LoRA (peft)", "": "Task",
        "hub": "Hugging Face Hub",
    }
    base_names = {f.name for f in dataclasses.fields(TrainConfig)}
    groups: dict[str, list[str]] = {}

    def add(group: str, name: str, f: dataclasses.Field, default: Any) -> None:
        tname = getattr(f.type, "__name__", None) or str(f.type).replace("typing.", "").replace("Optional", "optional")
        groups.setdefault(group, []).append(f"  {name:<30} {f.metadata.get('help', '')}  [{tname}, default: {default}]")

    for f in dataclasses.fields(config_cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is MISSING or default is dataclasses.MISSING:
            default = "required"
        if dataclasses.is_dataclass(default):
            for sub in dataclasses.fields(type(default)):
                add(f.metadata.get("group", f.name), f"{f.name}.{sub.name}", sub, getattr(default, sub.name))
            continue
        group = f.metadata.get("group", "") if f.name in base_names else "task"
        add(group, f.name, f, default)

    title = f"task={task_cls.name}" if task_cls is not None else "task"
    embedded = getattr(task_cls, "embedded_defaults", None)
    if embedded:
        groups.setdefault("task", []).append(
            "  (without model_name_or_path/config_name the tiny built-in model also uses: "
            + ", ".join(f"{k}={v}" for k, v in embedded.items()) + ")")
    lines = [
        "usage: accelerate launch -m notrainer.run task=NAME [key=value ...] [config=run.yaml]",
        "       python -m notrainer.run task=NAME --help     (adds that task's keys)",
        "",
    ]
    order = ["task", "run", "model", "data", "optim", "speed", "loop", "hub", "lora"]
    for g in order + [g for g in groups if g not in order]:
        if g not in groups:
            continue
        lines.append(f"{title} keys:" if g == "task" else f"{titles.get(g, g)}:")
        lines += groups[g]
        lines.append("")
    return "\n".join(lines)
