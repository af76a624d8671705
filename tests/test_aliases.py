"""Trainer / HF-script habits on the command line: `--key value`, `--key=value`, bare `--flag`,
and the Trainer's names as aliases of ours (notrainer/config/aliases.py, docs/coming-from-trainer.md).
Parsing only: nothing trains here."""

from __future__ import annotations

import dataclasses

import pytest

from notrainer.errors import UsageError
from notrainer.cli.run import parse_args


def parsed(*argv: str):
    cfg, _ = parse_args(list(argv))
    return dataclasses.asdict(cfg)


# (task, the Trainer's / HF scripts' spelling, ours): each pair must give the same config.
SAME = [
    ("clm", ["--learning_rate", "3e-4"], ["learning_rate=3e-4"]),
    ("clm", ["--learning_rate=3e-4"], ["learning_rate=3e-4"]),
    ("clm", ["--gradient_checkpointing"], ["gradient_checkpointing=true"]),
    ("clm", ["--do_eval", "false"], ["do_eval=false"]),
    ("clm", ["--seed", "-3"], ["seed=-3"]),
    ("clm", ["--max_steps", "7"], ["max_train_steps=7"]),
    ("clm", ["max_steps=-1"], []),
    ("clm", ["--warmup_steps", "5"], ["num_warmup_steps=5"]),
    ("clm", ["save_steps=10"], ["checkpointing_steps=10"]),
    ("clm", ["--save_strategy", "epoch"], ["checkpointing_steps=epoch"]),
    ("clm", ["--save_strategy", "no", "--save_steps", "10"], []),
    ("clm", ["--save_strategy", "steps", "--save_steps", "20"], ["checkpointing_steps=20"]),
    ("clm", ["--save_strategy", "steps"], ["checkpointing_steps=500"]),
    ("clm", ["--eval_strategy", "steps", "--eval_steps", "5"], ["eval_steps=5"]),
    ("clm", ["--evaluation_strategy", "steps", "--logging_steps", "4"], ["eval_steps=4", "logging_steps=4"]),
    ("clm", ["--eval_strategy", "epoch"], []),
    ("clm", ["--eval_strategy", "no"], ["do_eval=false"]),
    ("clm", ["--bf16"], ["mixed_precision=bf16"]),
    ("clm", ["--fp16", "true"], ["mixed_precision=fp16"]),
    ("clm", ["--bf16", "false"], []),
    ("clm", ["--optim", "adafactor"], ["optim=adafactor"]),
    ("clm", ["--data_seed", "11"], ["data_seed=11"]),
    ("clm", ["--lora_r", "4", "--lora_alpha", "8"], ["lora.r=4", "lora.alpha=8"]),
    ("clm", ["--report_to", "none", "--push_to_hub", "false"], ["report_to=none"]),
    ("sft", ["--max_length", "48"], ["max_seq_length=48"]),
    ("classification", ["--label_column_name", "y", "--max_seq_length", "32"], ["label_column=y", "max_seq_length=32"]),
    ("token_classification", ["--label_column_name", "ner_tags", "--text_column_name", "tokens"],
     ["tags_column=ner_tags", "words_column=tokens"]),
    ("qa", ["--question_column_name", "q", "--context_column_name", "c", "--answer_column_name", "a"],
     ["question_column=q", "context_column=c", "answer_column=a"]),
    ("seq2seq", ["--text_column", "document", "--summary_column", "summary"],
     ["source_column=document", "target_column=summary"]),
    # A mix of forms in one command line, with a key=value pair right after a bare flag.
    ("clm", ["--bf16", "logging_steps=3", "--max_steps", "9", "--overwrite_output_dir"],
     ["mixed_precision=bf16", "logging_steps=3", "max_train_steps=9", "overwrite_output_dir=true"]),
]


@pytest.mark.parametrize("task,theirs,ours", SAME, ids=[" ".join(t) or "-" for _, t, _ in SAME])
def test_every_alias_and_form_parses_to_our_spelling(task, theirs, ours):
    assert parsed(f"task={task}", *theirs) == parsed(f"task={task}", *ours)


def test_save_steps_10_is_checkpointing_steps_10():
    cfg, _ = parse_args(["task=clm", "save_steps=10"])
    assert cfg.checkpointing_steps == "10"


def test_aliases_work_in_the_yaml_file_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 12\nbf16: true\nsave_steps: 4\nlora_r: 2\n")
    cfg, _ = parse_args(["task=clm", f"config={path}"])
    assert (cfg.max_train_steps, cfg.mixed_precision, cfg.checkpointing_steps, cfg.lora.r) == (12, "bf16", "4", 2)


def test_an_alias_counts_as_given_for_the_embedded_defaults():
    # The embedded default's learning rate must not override what the user typed, in any form.
    cfg, _ = parse_args(["task=clm", "--learning_rate", "1e-5", "--warmup_steps", "3"])
    assert cfg.learning_rate == 1e-5 and cfg.num_warmup_steps == 3


@pytest.mark.parametrize("argv,hint", [
    (["task=clm", "label_column_name=y"], "label_column / tags_column"),
    (["task=classification", "label_colum_name=y"], "did you mean label_column"),
    (["task=token_classification", "label_colunm_name=y"], "did you mean tags_column"),
    (["task=clm", "save_step=10"], "did you mean checkpointing_steps"),
    (["task=clm", "--save_stepz", "10"], "did you mean checkpointing_steps"),
    (["task=clm", "warmup_step=3"], "did you mean num_warmup_steps"),
    (["task=clm", "--save_strategy", "sometimes"], "save_strategy must be steps, epoch or no"),
])
def test_typo_hint_prefers_the_alias_table(argv, hint):
    with pytest.raises(UsageError) as e:
        parse_args(argv)
    assert hint in str(e.value) and "eval_steps" not in str(e.value)
    assert "\n" not in str(e.value)


def test_hub_token_never_reaches_config_yaml(tmp_path):
    from notrainer.config import save_yaml, to_dict

    cfg, _ = parse_args(["task=clm", "hub_token=hf_secret"])
    assert to_dict(cfg)["hub_token"] is None
    save_yaml(cfg, str(tmp_path / "config.yaml"))
    assert "hf_secret" not in (tmp_path / "config.yaml").read_text()
    assert cfg.hub_token == "hf_secret"  # the run itself still has it


def _data_order(tmp_path, **settings) -> list[float]:
    """The first epoch's order of a shuffled loader as the loop prepares it."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from conftest import reset_accelerate_state
    from notrainer import Loop

    reset_accelerate_state()
    model = torch.nn.Linear(1, 1)
    loader = DataLoader(TensorDataset(torch.arange(16.0).unsqueeze(1)), batch_size=16, shuffle=True)
    loop = Loop(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, loss_fn=lambda m, b: m(b[0]).mean(),
                max_train_steps=1, output_dir=str(tmp_path), export=False, progress=False, **settings)
    loop.train_loader.set_epoch(0)
    return next(iter(loop.train_loader))[0].flatten().tolist()


def test_data_seed_seeds_the_data_order_alone(tmp_path):
    by_seed = _data_order(tmp_path, seed=1)
    assert _data_order(tmp_path, seed=7, data_seed=1) == by_seed  # data_seed decides the order...
    assert _data_order(tmp_path, seed=1, data_seed=2) != by_seed  # ...not seed, once it is given
