"""LoRA (lora.*): only adapters train, adapter folder export, merged export equals base+adapter,
resume with adapters, gradient checkpointing with adapters, heads kept trainable per task."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import load_file

from notrainer.errors import UsageError

from conftest import run_cli

# each test here trains a model (or shares one a module fixture trains): the quick check
# (-m "not slow") leaves them to the full suite
pytestmark = pytest.mark.slow

FAST = ("max_train_samples=64", "max_eval_samples=16", "logging_steps=1000")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_folder):
    out = tmp_path_factory.mktemp("lora") / "run"
    results = run_cli("task=sft", f"model_name_or_path={base_folder}", "lora.r=8", "lora.merge=true",
                      "learning_rate=1e-2", "max_train_steps=6", *FAST, output_dir=out)
    return out, results


def test_adapter_folder_and_frozen_base(lora_run, base_folder):
    out, results = lora_run
    assert results["global_step"] == 6
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]  # peft's default for llama
    assert config["base_model_name_or_path"] == str(base_folder)
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B starts at 0: it trained
    assert not (out / "model.safetensors").exists()  # the full weights are not duplicated at the top


def test_merged_folder_loads_without_peft_and_matches_base_plus_adapter(lora_run, base_folder):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = lora_run
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    with_adapter = AutoPeftModelForCausalLM.from_pretrained(out).eval()  # base from base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    tok = AutoTokenizer.from_pretrained(out / "merged")
    ids = tok.apply_chat_template([{"role": "user", "content": "what is 2 plus 3 ?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        m, a, b = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(m, a, atol=1e-5, rtol=1e-5)
    assert (m - b).abs().max() > 1e-3  # the adapter changed something, so the equality means something
    # Only the adapters trained: the base weights inside the peft model are the original ones.
    base_sd = base.state_dict()
    for name, p in with_adapter.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_sd[name.replace(".base_layer.", ".")]), name


def test_an_adapter_folder_as_model_continues_training_that_adapter(lora_run, tmp_path):
    out, _ = lora_run
    res = run_cli("task=sft", f"model_name_or_path={out}", "learning_rate=1e-2", "max_train_steps=2", *FAST,
                  output_dir=tmp_path / "more")
    assert res["global_step"] == 2
    before = load_file(out / "adapter_model.safetensors")
    after = load_file(tmp_path / "more" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(UsageError, match="is a LoRA adapter folder"):
        run_cli("task=sft", f"model_name_or_path={out}", "lora.r=4", *FAST, output_dir=tmp_path / "new")


def test_an_adapter_folder_is_told_apart_from_a_model_folder(lora_run, base_folder, tmp_path):
    """Adapter folders load through peft's own API (transformers' adapter loading demands a newer
    peft than the registry has); a model folder or Hub name goes to from_pretrained unchanged."""
    from notrainer.modeling.lora import adapter_base

    out, _ = lora_run
    assert adapter_base(out) == str(base_folder)
    assert adapter_base(base_folder) is None and adapter_base("org/some-model") is None
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(UsageError, match="names no base_model_name_or_path"):
        adapter_base(tmp_path)


def test_lora_from_scratch_is_self_contained_and_resumes(tmp_path):
    """The embedded default (random base): the base weights are exported beside the adapter, and
    a run resumed from its checkpoint ends with the same adapter as the uninterrupted run."""
    from peft import AutoPeftModelForCausalLM

    common = ("task=sft", "lora.r=4", "max_train_steps=4", *FAST)
    full = run_cli(*common, "checkpointing_steps=2", output_dir=tmp_path / "full")
    assert full["global_step"] == 4
    ckpt = tmp_path / "full" / "checkpoints" / "step_2"
    resumed = run_cli(*common, f"resume_from_checkpoint={ckpt}", output_dir=tmp_path / "resumed")
    assert resumed["global_step"] == 4
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "full" / "base_model")
    assert AutoPeftModelForCausalLM.from_pretrained(tmp_path / "full") is not None


def test_gradient_checkpointing_with_lora_gives_the_same_adapter(tmp_path):
    common = ("task=sft", "lora.r=4", "lora.dropout=0", "max_train_steps=3", *FAST)
    plain = run_cli(*common, output_dir=tmp_path / "plain")
    ckpt = run_cli(*common, "gradient_checkpointing=true", output_dir=tmp_path / "gc")
    assert plain["global_step"] == ckpt["global_step"] == 3
    a = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    b = load_file(tmp_path / "gc" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in b.items() if ".lora_B." in k)  # gradients reached the adapters
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def _wrap(model_type: str, auto: str, **overrides):
    import transformers

    from notrainer.data.builtin import tiny_config, train_tokenizer
    from notrainer.config import TrainConfig
    from notrainer.modeling.lora import apply_lora

    tok = train_tokenizer(["a small test corpus for the tokenizer"] * 4, vocab_size=120)
    torch.manual_seed(0)
    base = getattr(transformers, auto).from_config(tiny_config(model_type, tok, **overrides))
    cfg = TrainConfig()
    cfg.lora.r, cfg.lora.dropout, cfg.lora.merge = 4, 0.0, True
    return apply_lora(base, cfg, types.SimpleNamespace(auto_model=auto)).eval()


@pytest.mark.parametrize("model_type, auto, head", [
    ("bert", "AutoModelForSequenceClassification", "classifier"),  # the new head trains and is merged
    ("gpt2", "AutoModelForCausalLM", None),  # Conv1D layers: peft's fan_in_fan_out path
    ("bert", "AutoModelForTokenClassification", "classifier"),
])
def test_trainable_parameters_and_merge_per_architecture(model_type, auto, head):
    from notrainer.modeling.lora import merged_state_dict

    model = _wrap(model_type, auto, num_labels=3) if head else _wrap(model_type, auto)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or (head and f"{head}.modules_to_save" in n) for n in trainable)
    if head:
        assert any(f"{head}.modules_to_save" in n for n in trainable)
    with torch.no_grad():  # move every trainable tensor away from its init (lora_B starts at 0)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    merged = type(model.get_base_model())(model.get_base_model().config).eval()
    assert merged.load_state_dict(merged_state_dict(model, model.state_dict()), strict=True)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args, match", [
    (("lora.r=4", "lora.target_modules=[no_such_layer]"), "lora.target_modules"),
    (("lora.r=4", "lora.dropout=1.5"), "lora.dropout must be in"),
    (("lora.r=4", "lora.alpha=0"), "lora.alpha must be > 0"),
    (("lora.r=4", "lora.merge=true", "lora.target_modules=[embed_tokens]"), "cannot merge into"),
])
def test_bad_lora_settings(tmp_path, args, match):
    with pytest.raises(UsageError, match=match):
        run_cli("task=sft", *args, *FAST, output_dir=tmp_path)


def _topic_csv(path, n: int, seed: int):
    import csv

    from notrainer.tasks.classification import builtin_topic_sentences

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(builtin_topic_sentences(n, seed=seed))
    return path


def test_a_classification_adapter_folder_reads_its_head_from_its_base(tmp_path):
    """Label names and the head size come from the adapter's base config (an adapter folder has
    no config.json): evaluation without training data, and training on, both from the folder."""
    run = tmp_path / "run"
    train, val = _topic_csv(tmp_path / "train.csv", 64, seed=0), _topic_csv(tmp_path / "val.csv", 40, seed=7)
    trained = run_cli("task=classification", f"train_file={train}", f"validation_file={val}", "lora.r=4",
                      "learning_rate=5e-3", "max_train_steps=8", *FAST, output_dir=run)
    assert (run / "adapter_config.json").is_file() and not (run / "config.json").exists()
    # no training data: the labels come from base_model/config.json, the adapter's base
    ev = run_cli("task=classification", f"model_name_or_path={run}", f"validation_file={val}", "do_train=false",
                 *FAST, output_dir=tmp_path / "eval")
    assert ev["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-6)
    assert ev["eval_accuracy"] == trained["eval_accuracy"]
    more = run_cli("task=classification", f"model_name_or_path={run}", "max_train_steps=2", *FAST,
                   output_dir=tmp_path / "more")
    assert more["global_step"] == 2


def test_a_classification_adapter_on_a_headless_base_asks_for_the_training_data(tmp_path):
    from transformers import AutoModel

    from notrainer.data.builtin import tiny_config
    from notrainer.cli.run import parse_args

    cfg, task_cls = parse_args(["task=classification"])
    task = task_cls(cfg)
    tok = task.build_tokenizer(task.load_raw_datasets())
    base = tmp_path / "base"
    AutoModel.from_config(tiny_config("bert", tok)).save_pretrained(base)  # no head, as sentence encoders ship
    tok.save_pretrained(base)
    run_cli("task=classification", f"model_name_or_path={base}", "lora.r=4", "max_train_steps=2", *FAST,
            output_dir=tmp_path / "run")
    val = _topic_csv(tmp_path / "val.csv", 40, seed=7)
    with pytest.raises(UsageError, match="its labels are not recorded; give the training data too"):
        run_cli("task=classification", f"model_name_or_path={tmp_path / 'run'}", f"validation_file={val}",
                "do_train=false", output_dir=tmp_path / "eval")
    train = _topic_csv(tmp_path / "train.csv", 64, seed=0)
    ev = run_cli("task=classification", f"model_name_or_path={tmp_path / 'run'}", f"train_file={train}",
                 f"validation_file={val}", "do_train=false", output_dir=tmp_path / "eval2")
    assert "eval_accuracy" in ev


def test_a_seq2seq_adapter_folder_continues_training(tmp_path):
    """seq2seq checks that the model is an encoder-decoder from its config: for an adapter
    folder, the base's."""
    common = ("task=seq2seq", "max_train_steps=2", "max_train_samples=32", "max_eval_samples=8", "logging_steps=1000")
    run_cli(*common, "lora.r=4", output_dir=tmp_path / "run")
    more = run_cli(*common, f"model_name_or_path={tmp_path / 'run'}", output_dir=tmp_path / "more")
    assert more["global_step"] == 2 and (tmp_path / "more" / "adapter_model.safetensors").is_file()
