"""The model card: Hub metadata the Hub can read, hyperparameters, results, versions."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from notrainer.observability import history
from notrainer.observability.model_card import write_model_card


def _run(tmp_path, **cfg):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a transformers export
    for s in (1, 2, 3, 4):
        history.append(str(out), history.train_record(s, s / 4, loss=2.0 - s / 4))
        if s % 2 == 0:
            history.append(str(out), history.eval_record(s, s / 4, {"eval_loss": 1.5 - s / 10, "eval_accuracy": s / 5}))
    results = {"train_loss": 1.4, "train_runtime": 3.2, "eval_loss": 1.1, "eval_accuracy": 0.8,
               "eval_f1": 0.75, "eval_runtime": 0.4, "eval_samples": 64}
    (out / "all_results.json").write_text(json.dumps(results))
    base = dict(task="classification", learning_rate=3e-4, per_device_train_batch_size=8, seed=42,
                lr_scheduler_type="linear", num_train_epochs=1.0, mixed_precision="no", lora={"r": 0})
    base.update(cfg)
    return out, base


def test_card_for_a_hub_model_and_dataset(tmp_path):
    out, cfg = _run(tmp_path, model_name_or_path="bert-base-uncased", dataset_name="glue", dataset_config_name="sst2")
    path = write_model_card(str(out), cfg)
    card = ModelCard.load(path)  # huggingface_hub parses and validates the metadata
    d = card.data.to_dict()
    assert d["base_model"] == "bert-base-uncased"
    assert d["datasets"] == ["glue"]
    assert d["library_name"] == "transformers"
    assert d["pipeline_tag"] == "text-classification"
    assert "notrainer" in d["tags"]
    assert sorted(d["metrics"]) == ["accuracy", "f1"]
    got = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert got == {"accuracy": 0.8, "f1": 0.75}  # runtime/samples are not quality metrics
    assert card.data.eval_results[0].dataset_config == "sst2"
    text = card.text
    assert "- learning_rate: 0.0003" in text and "- per_device_train_batch_size: 8" in text
    assert "| 1.5 | 0.5 | 2 | 1.3 | 0.4 |" in text  # training results row at step 2
    assert "- transformers " in text and "- torch " in text and "- accelerate " in text


def test_card_for_local_files_names_no_machine_path(tmp_path):
    model = tmp_path / "my-local-bert"
    model.mkdir()
    train = tmp_path / "train.jsonl"
    train.write_text("{}\n")
    out, cfg = _run(tmp_path, model_name_or_path=str(model), train_file=str(train), validation_file=str(train),
                    lora={"r": 8, "alpha": 16})
    path = write_model_card(str(out), cfg)
    raw = open(path).read()
    assert str(tmp_path) not in raw  # no absolute path of this machine
    card = ModelCard.load(path)
    assert card.data.base_model is None  # a local folder is not a Hub base model
    assert "`my-local-bert`" in card.text and "`train.jsonl`" in card.text
    assert "- lora.r: 8" in card.text
    assert card.data.eval_results[0].dataset_name == "train.jsonl"


def test_card_for_a_random_init_run_without_eval(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    history.append(str(out), history.train_record(1, 1.0, loss=3.0))
    (out / "adapter_config.json").write_text("{}")  # a LoRA adapter export
    card = ModelCard.load(write_model_card(str(out), {"task": "notrainer.tasks.clm:CLMTask"}))
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert card.data.eval_results is None
    assert "randomly initialised" in card.text
